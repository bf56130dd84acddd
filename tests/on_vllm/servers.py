"""``vllm serve`` for the tests, on the loopback interface: one server per family for the whole
session, which every test that sends OpenAI requests to that family shares.

A test asks for one with ``@pytest.mark.parametrize("server", [family, ...], indirect=True)``
(conftest.py's session fixture). pytest runs each family's tests together, wherever they are
defined, so one server lives at a time and starts once: a start costs about 35 s here, more than
most of the tests it serves. Every server runs with the union of what its tests need (``ARGS``,
``OPTIONS``): the records of what DeSAP kept (``served_history``), two images and a video a
prompt, per-request DeSAP options, 32-token blocks and the prompt's cached-token count. A test
starts from :meth:`Server.fresh` when it counts on empty caches and records."""
import base64
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engines import engine_environment
from probe import read_records

from desap_ops.benchmarks.vllm.processes import free_port, is_healthy

# each family's DeSAP options (the engine's defaults for every request); LLaVA's engine lets a
# request ask for up to 12 tokens an image (test_vllm_request_options.py) and for four methods, two
# of them the test plugin's (test_vllm_serve.py)
OPTIONS = {"llava": {"keep": 6, "task_ratio": 0.5, "max_keep": 12,
                     "methods": ["desap", "saliency", "largest-norm", "broken-order"]},
           "llava_next": {"keep": 12, "task_ratio": 0.5}, "qwen2_5_vl": {"keep": 6}, "qwen3_vl": {"keep": 6}}
ENGINE_ONLY = ("max_keep", "methods")   # the engine's limits on requests, which apply_desap has not
VIDEO_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
BLOCK = 32   # tokens a KV block: a short first turn fills whole blocks a second turn can reuse
ENVIRONMENT = {"VLLM_SERVER_DEV_MODE": "1"}   # /collective_rpc and the cache resets


def args(family: str) -> list[str]:
    """The ``vllm serve`` arguments, beyond the model and DeSAP's options, every family's server takes."""
    limits = {"image": 2, **({"video": 1} if family in VIDEO_FAMILIES else {})}
    return ["--worker-extension-cls", "served_history.DesapHistory", "--limit-mm-per-prompt", json.dumps(limits),
            "--enable-prompt-tokens-details", "--block-size", str(BLOCK), "--trust-request-mm-kwargs"]


def apply_desap_options(family: str) -> dict:
    """The server's DeSAP options as apply_desap takes them (without ``ENGINE_ONLY``)."""
    return {k: v for k, v in OPTIONS[family].items() if k not in ENGINE_ONLY}


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


class Server:
    """One family's shared ``vllm serve``: its URL, process, checkpoint folder, options and log."""

    def __init__(self, family: str, url: str, process: subprocess.Popen, folder: Path, log: Path):
        self.family, self.url, self.process, self.folder, self.log = family, url, process, folder, log
        self.options = apply_desap_options(family)

    def chat(self, messages: list, max_tokens: int = 6) -> tuple[int, dict]:
        """A greedy chat request that also returns the prompt's token ids."""
        return send(self.url, {"model": str(self.folder), "temperature": 0, "max_tokens": max_tokens,
                               "return_token_ids": True, "messages": messages})

    def fresh(self) -> None:
        """Empty the prefix, multimodal and encoder caches and forget the records: the next request
        runs the encoder, and :meth:`records` holds only what came after."""
        for path in ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache"):
            urllib.request.urlopen(urllib.request.Request(self.url + path, b"", method="POST"), timeout=60).close()
        post(f"{self.url}/collective_rpc", {"method": "desap_forget"})

    def records(self) -> list:
        """What DeSAP kept since the last call (and forgets it): one record per image or video."""
        history = post(f"{self.url}/collective_rpc", {"method": "desap_history"})["results"][0]["history"]
        post(f"{self.url}/collective_rpc", {"method": "desap_forget"})
        return read_records(history)

    def metric(self, name: str) -> float:
        """The sum of a Prometheus counter's series on ``/metrics``."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))

    def alive(self) -> bool:
        return self.process.poll() is None and is_healthy(self.url)

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]
