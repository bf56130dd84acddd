"""``vllm serve`` with DeSAP under load: many concurrent OpenAI chat requests over a few images and
questions that repeat. A repeat finds its image in vLLM's processor cache (keyed by image, prompt
text and options), a path a single request never takes. No request may fail, every repeat of an
(image, question) pair gets the first one's answer, a bad request gets a 4xx and the server stays up.
The servers are the session's shared ones (``servers.py``)."""
import random
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import servers

IMAGES = ("square", "other", "wide", "large")
QUESTIONS = ("what is the color of the sky ?", "read the text on the sign")
REPEATS = 4          # each (image, question) pair, shuffled: 4 images x 2 questions x 4 = 32 requests
CONCURRENCY = 8
LOAD_TIMEOUT = 120   # seconds for all the requests together


def _send(url: str, body: dict) -> tuple[int, dict]:
    return servers.send(url, body, timeout=LOAD_TIMEOUT)


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


@pytest.mark.parametrize("server", ["llava", "llava_next"], indirect=True)
def test_repeated_concurrent_chat_requests_all_succeed_with_stable_answers(server, checkpoints):
    kind, folder = server.family, server.folder
    pairs = [(image, question) for image in IMAGES for question in QUESTIONS] * REPEATS
    random.Random(0).shuffle(pairs)
    bodies = [servers.chat_body(folder, checkpoints[image], question) for image, question in pairs]
    # in the middle of the load, a request DeSAP refuses: its text holds a second image placeholder
    middle = len(bodies) // 2
    bodies.insert(middle, servers.chat_body(folder, checkpoints["square"], "what is <image> in the picture ?"))
    server.fresh()
    hits_before = server.metric("vllm:mm_cache_hits_total")
    started = time.time()
    replies = _load(server.url, bodies)
    elapsed = time.time() - started
    cache_hits = server.metric("vllm:mm_cache_hits_total") - hits_before
    assert server.alive(), server.log_tail()

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
