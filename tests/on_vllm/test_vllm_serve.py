"""``vllm serve`` with DeSAP on the loopback interface: an OpenAI-compatible chat request with an
image gets the pruned prompt and the same greedy answer as transformers with apply_desap (the
session's shared LLaVA server, ``servers.py``)."""
import pytest
import servers

from engines import transformers_run

QUESTION = "what is the color of the sky ?"


@pytest.mark.parametrize("server", ["llava"], indirect=True)
def test_vllm_serve_answers_a_chat_request_with_an_image_as_apply_desap_does(server, checkpoints):
    image = checkpoints["square"]
    status, reply = servers.send(server.url, servers.chat_body(server.folder, image, QUESTION))
    assert status == 200, reply

    # the chat template renders "USER: <image> {question} ASSISTANT:"
    want = transformers_run("llava", server.folder, f"USER: <image> {QUESTION} ASSISTANT:", image, server.options)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.folder)
    assert reply["usage"]["prompt_tokens"] == len(want["prompt_ids"])   # 6 image tokens, not 16
    # the same words (the server's incremental detokenizer spaces them its own way)
    answer = reply["choices"][0]["message"]["content"].split()
    assert answer == tokenizer.decode(want["output_ids"], skip_special_tokens=True).split() and answer
