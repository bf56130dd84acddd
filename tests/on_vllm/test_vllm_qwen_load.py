"""``vllm serve`` with DeSAP's Qwen2.5-VL under load, on the loopback interface: 24 concurrent
OpenAI chat requests over 3 images (three shapes: 16, 8 and 8 tokens) and 4 questions, each
(image, question) pair twice in a shuffled order, at concurrency 8, all within a bounded time (the
server stops with the test). No request may fail, every repeat of a pair gets the first one's
answer and prompt length, which are apply_desap's, and the repeats take vLLM's processor cache.
In the middle of the load, two malformed requests (a data URL that is not base64, one that is no
image) each get a 4xx, and two whose image URL cannot be read (a local file, a port nothing answers
on) get an error (vLLM 0.32 answers its own fetch failure with a 500); the server stays up and
answers after them. The server is the session's shared Qwen2.5-VL one (``servers.py``); the load
helpers are ``test_vllm_load.py``'s."""
import base64
import random
import time

import pytest
import servers
import test_vllm_load as load

from engines import rendered_chat, transformers_run

from desap_ops.benchmarks.vllm.processes import free_port

IMAGES = ("large", "wide", "tall")
QUESTIONS = ("what is the color of the sky ?", "read the text on the sign", "how many people are there ?",
             "where is the dog on the left ?")
REPEATS = 2   # 3 images x 4 questions x 2 = 24 requests


def _with_url(body: dict, url: str) -> dict:
    """``body`` with its image's URL replaced."""
    content = [dict(part) for part in body["messages"][0]["content"]]
    content[0] = {"type": "image_url", "image_url": {"url": url}}
    return {**body, "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize("server", ["qwen2_5_vl"], indirect=True)
def test_repeated_concurrent_qwen_chat_requests_all_succeed_with_apply_desaps_answers(server, checkpoints):
    folder = server.folder
    pairs = [(image, question) for image in IMAGES for question in QUESTIONS] * REPEATS
    random.Random(0).shuffle(pairs)
    bodies = [servers.chat_body(folder, checkpoints[image], question) for image, question in pairs]
    middle = len(bodies) // 2
    # malformed: a data URL that is not base64, and base64 that is no image
    malformed = [_with_url(bodies[0], "data:image/png;base64,this-is-not-base64!"),
                 _with_url(bodies[0], "data:image/png;base64," + base64.b64encode(b"no image here").decode())]
    # image URLs that cannot be read: a local file (not allowed) and one nothing answers on; vLLM
    # 0.32 raises from its own media fetch before any model code runs, and answers 500
    unreadable = [_with_url(bodies[0], "file:///nonexistent/missing.png"),
                  _with_url(bodies[0], f"http://127.0.0.1:{free_port()}/missing.png")]
    broken = malformed + unreadable
    bodies[middle:middle] = broken
    server.fresh()
    hits_before = server.metric("vllm:mm_cache_hits_total")
    started = time.time()
    replies = load._load(server.url, bodies)
    elapsed = time.time() - started
    cache_hits = server.metric("vllm:mm_cache_hits_total") - hits_before
    assert server.alive(), server.log_tail()
    # still serving after the bad requests: one more good request
    status, after = load._send(server.url, bodies[0])
    assert status == 200, after

    bad = [replies.pop(middle) for _ in broken]
    assert all(400 <= status < 500 for status, _ in bad[:len(malformed)]), bad
    assert all(status >= 400 for status, _ in bad[len(malformed):]), bad
    failed = [(pair, status, reply) for pair, (status, reply) in zip(pairs, replies) if status != 200]
    assert not failed, failed[:3]
    first = {}
    for pair, (_, reply) in zip(pairs + [pairs[0]], replies + [(200, after)]):
        answer = (reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"])
        assert first.setdefault(pair, answer) == answer, (pair, first[pair], answer)
    assert cache_hits > 0   # the repeats took the processor cache's path

    # each pair's answer is apply_desap's on the prompt the chat template renders
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for (image, question), (content, prompt_tokens) in first.items():
        prompt = rendered_chat(folder, servers.chat_body(folder, checkpoints[image], question)["messages"])
        want = transformers_run("qwen2_5_vl", folder, prompt, checkpoints[image], server.options)
        assert prompt_tokens == len(want["prompt_ids"]), (image, question)
        assert content.split() == tokenizer.decode(want["output_ids"], skip_special_tokens=True).split(), \
            (image, question)
    print(f"qwen2_5_vl: {len(bodies)} requests at concurrency {load.CONCURRENCY} in {elapsed:.1f} s, "
          f"{cache_hits:.0f} processor-cache hits")

