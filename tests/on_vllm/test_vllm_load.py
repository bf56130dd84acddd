"""``vllm serve`` with DeSAP under load: many concurrent OpenAI chat requests over a few images and
questions that repeat. A repeat finds its image in vLLM's processor cache (keyed by image, prompt
text and options), a path a single request never takes. No request may fail, every repeat of an
(image, question) pair gets the first one's answer, a bad request gets a 4xx and the server stays up."""
import random
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import test_vllm_serve as serve

IMAGES = ("square", "other", "wide", "large")
QUESTIONS = ("what is the color of the sky ?", "read the text on the sign")
REPEATS = 4          # each (image, question) pair, shuffled: 4 images x 2 questions x 4 = 32 requests
CONCURRENCY = 8
LOAD_TIMEOUT = 120   # seconds for all the requests together


def _send(url: str, body: dict) -> tuple[int, dict]:
    return serve.send(url, body, timeout=LOAD_TIMEOUT)


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def _load(url: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    """Send ``bodies`` CONCURRENCY at a time; their (status, reply) in order, all within LOAD_TIMEOUT."""
    pool = ThreadPoolExecutor(CONCURRENCY)
    try:
        futures = [pool.submit(_send, url, body) for body in bodies]
        _, pending = wait(futures, timeout=LOAD_TIMEOUT)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)   # on a timeout, stopping the server ends the rest
    assert not pending, f"{len(pending)} of {len(futures)} requests unanswered after {LOAD_TIMEOUT} s"
    return [f.result() for f in futures]


@pytest.mark.parametrize("kind, options", [("llava", {"keep": 6, "task_ratio": 0.5}),
                                           ("llava_next", {"keep": 12, "task_ratio": 0.5})])
def test_repeated_concurrent_chat_requests_all_succeed_with_stable_answers(checkpoints, tmp_path, kind, options):
    folder = checkpoints[kind]
    pairs = [(image, question) for image in IMAGES for question in QUESTIONS] * REPEATS
    random.Random(0).shuffle(pairs)
    bodies = [serve.chat_body(folder, checkpoints[image], question) for image, question in pairs]
    # in the middle of the load, a request DeSAP refuses: its text holds a second image placeholder
    middle = len(bodies) // 2
    bodies.insert(middle, serve.chat_body(folder, checkpoints["square"], "what is <image> in the picture ?"))
    with serve.served(folder, options, tmp_path / "serve.log") as (url, server):
        started = time.time()
        replies = _load(url, bodies)
        elapsed = time.time() - started
        cache_hits = _metric(url, "vllm:mm_cache_hits_total")
        assert server.poll() is None and serve.is_healthy(url), (tmp_path / "serve.log").read_text()[-4000:]

    status, reply = replies.pop(middle)
    assert 400 <= status < 500 and "DeSAP found 2 image placeholder tokens" in reply["error"], (status, reply)
    failed = [(pair, status, reply) for pair, (status, reply) in zip(pairs, replies) if status != 200]
    assert not failed, failed[:3]
    first = {}
    for pair, (_, reply) in zip(pairs, replies):
        answer = (reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"])
        assert first.setdefault(pair, answer) == answer, (pair, first[pair], answer)
    assert cache_hits > 0   # the repeats did take the processor cache's path
    print(f"{kind}: {len(bodies)} requests at concurrency {CONCURRENCY} in {elapsed:.1f} s, "
          f"{cache_hits:.0f} processor-cache hits")
