"""``vllm serve`` with DeSAP on the loopback interface: an OpenAI-compatible chat request with an
image gets the pruned prompt and the same greedy answer as transformers with apply_desap. The
server helpers here serve ``test_vllm_load.py`` and ``test_vllm_request_options.py`` too."""
import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engines import engine_environment, transformers_run

from desap_ops.benchmarks.vllm.processes import free_port, is_healthy

OPTIONS = {"keep": 6, "task_ratio": 0.5}
QUESTION = "what is the color of the sky ?"


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def send(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """(HTTP status, JSON reply) of one chat request; a 4xx or 5xx is returned, not raised."""
    try:
        return 200, post(f"{url}/v1/chat/completions", body, timeout=timeout)
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")}


def chat_body(folder: Path, image: str, question: str, max_tokens: int = 8) -> dict:
    """A greedy OpenAI chat request with ``image`` as a PNG data URL before ``question``."""
    data = base64.b64encode(open(image, "rb").read()).decode()
    return {"model": str(folder), "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": question}]}]}


@contextmanager
def served(folder: Path, options: dict, log_file: Path, start_timeout: float = 300,
           extra_args: Sequence[str] = (), env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``vllm serve folder`` with DeSAP ``options`` on 127.0.0.1 and ``extra_args`` (``env``: more
    environment variables): (its base URL, its process), once healthy; stopped on exit. Its output
    goes to ``log_file``."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--hf-overrides", json.dumps({"desap": options}), "--dtype", "float32",
               "--max-model-len", "512", "--gpu-memory-utilization", "0.1", "--enforce-eager", "--seed", "0",
               *extra_args]
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "w") as log:
        server = subprocess.Popen(command, env={**engine_environment(), **(env or {})}, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + start_timeout
            while not is_healthy(url):
                assert server.poll() is None, Path(log_file).read_text()[-4000:]
                assert time.time() < deadline, f"vllm serve did not start in {start_timeout} s"
                time.sleep(2)
            yield url, server
        finally:
            server.terminate()
            server.wait(timeout=60)


def test_vllm_serve_answers_a_chat_request_with_an_image_as_apply_desap_does(checkpoints, tmp_path):
    folder, image = checkpoints["llava"], checkpoints["square"]
    with served(folder, OPTIONS, tmp_path / "serve.log") as (url, _):
        reply = post(f"{url}/v1/chat/completions", chat_body(folder, image, QUESTION))

    # the chat template renders "USER: <image> {question} ASSISTANT:"
    want = transformers_run("llava", folder, f"USER: <image> {QUESTION} ASSISTANT:", image, OPTIONS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert reply["usage"]["prompt_tokens"] == len(want["prompt_ids"])   # 6 image tokens, not 16
    # the same words (the server's incremental detokenizer spaces them its own way)
    answer = reply["choices"][0]["message"]["content"].split()
    assert answer == tokenizer.decode(want["output_ids"], skip_special_tokens=True).split() and answer
