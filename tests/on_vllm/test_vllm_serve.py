"""``vllm serve`` with DeSAP on the loopback interface: an OpenAI-compatible chat request with an
image gets the pruned prompt and the same greedy answer as transformers with apply_desap."""
import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from engines import engine_environment, transformers_run

OPTIONS = {"keep": 6, "task_ratio": 0.5}
QUESTION = "what is the color of the sky ?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def test_vllm_serve_answers_a_chat_request_with_an_image_as_apply_desap_does(checkpoints, tmp_path):
    folder, image = checkpoints["llava"], checkpoints["square"]
    port = _free_port()
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--hf-overrides", json.dumps({"desap": OPTIONS}), "--dtype", "float32",
               "--max-model-len", "512", "--gpu-memory-utilization", "0.1", "--enforce-eager", "--seed", "0"]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, env=engine_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not start in 300 s"
            time.sleep(2)
        data = base64.b64encode(open(image, "rb").read()).decode()
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": str(folder), "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                {"type": "text", "text": QUESTION}]}]})
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

    # the chat template renders "USER: <image> {question} ASSISTANT:"
    want = transformers_run("llava", folder, f"USER: <image> {QUESTION} ASSISTANT:", image, OPTIONS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert reply["usage"]["prompt_tokens"] == len(want["prompt_ids"])   # 6 image tokens, not 16
    # the same words (the server's incremental detokenizer spaces them its own way)
    answer = reply["choices"][0]["message"]["content"].split()
    assert answer == tokenizer.decode(want["output_ids"], skip_special_tokens=True).split() and answer
