"""``vllm serve`` with DeSAP on the loopback interface: an OpenAI-compatible chat request with an
image gets the pruned prompt and the same greedy answer as transformers with apply_desap (the
session's shared LLaVA server, ``servers.py``); per request, with the pruning method it asks for,
the test plugin's among them, found through its entry point alone (tests/method_plugin, installed
in this environment)."""
import pytest
import servers

from engines import transformers_run

from desap_ops.methods import get_method

QUESTION = "what is the color of the sky ?"
PROMPT = f"USER: <image> {QUESTION} ASSISTANT:"   # what the chat template renders


def _same_answer(server, reply: dict, want: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.folder)
    assert reply["usage"]["prompt_tokens"] == len(want["prompt_ids"])
    # the same words (the server's incremental detokenizer spaces them its own way)
    answer = reply["choices"][0]["message"]["content"].split()
    assert answer == tokenizer.decode(want["output_ids"], skip_special_tokens=True).split() and answer


@pytest.mark.parametrize("server", ["llava"], indirect=True)
def test_vllm_serve_answers_a_chat_request_with_an_image_as_apply_desap_does(server, checkpoints):
    image = checkpoints["square"]
    status, reply = servers.send(server.url, servers.chat_body(server.folder, image, QUESTION))
    assert status == 200, reply

    want = transformers_run("llava", server.folder, PROMPT, image, server.options)
    assert want["prompt_ids"].count(100) == server.options["keep"]   # 6 image tokens (id 100), not 16
    _same_answer(server, reply, want)


@pytest.mark.parametrize("server", ["llava"], indirect=True)
def test_vllm_serve_prunes_with_each_requests_method_refuses_bad_ones_and_outlives_a_broken_plugin(
        server, checkpoints):
    # the server allows desap, saliency and the plugin's largest-norm and broken-order (servers.OPTIONS)
    from desap_ops.methods import MethodFailure

    folder = server.folder

    def ask(image: str, method: str) -> tuple[int, dict]:
        body = servers.chat_body(folder, checkpoints[image], QUESTION)
        return servers.send(server.url, {**body, "mm_processor_kwargs": {"desap": {"method": method}}})

    def expected(image: str, method: str) -> dict:
        return transformers_run("llava", folder, PROMPT, checkpoints[image], {**server.options, "method": method})

    server.fresh()
    asked = [("square", "saliency"), ("square", "largest-norm")]   # one image, two methods, two choices
    replies = [ask(*a) for a in asked]
    records = server.records()
    refused = [ask("square", "no-such"), ask("square", "divprune")]
    broken = ask("other", "broken-order")
    broken_records = server.records()
    after = ask("other", "saliency")
    after_records = server.records()

    wants = [expected(*a) for a in asked]
    assert wants[0]["indices"] != wants[1]["indices"]
    for (status, reply), want in zip(replies, wants):
        assert status == 200, reply
        _same_answer(server, reply, want)
    assert [r.indices.tolist() for r in records] == [w["indices"][0] for w in wants]

    for (status, reply), message in zip(refused, [
            "method 'no-such' is not a registered pruning method",
            "is 'divprune', which this engine does not allow"]):
        assert status == 400 and message in reply["error"].replace('\\"', '"'), reply

    # broken-order gives descending indices: transformers refuses it by name; the server logs it by
    # name and keeps the image's first tokens (the method "first"), the request completes
    with pytest.raises(MethodFailure, match="pruning method 'broken-order' returned indices that are not strictly"):
        expected("other", "broken-order")
    status, reply = broken
    assert status == 200, reply
    assert [(r.indices.tolist(), r.method) for r in broken_records] == [(list(range(server.options["keep"])), "first")]
    # the fallback merges as the failed method would have (a plugin's default: Method.merges, True)
    assert get_method("broken-order").merges
    _same_answer(server, reply, transformers_run("llava", folder, PROMPT, checkpoints["other"],
                                                 {**server.options, "method": "first", "merge": True}))
    log = server.log.read_text()
    assert "DeSAP: MethodFailure: pruning method 'broken-order' returned indices that are not strictly" in log

    # and the server goes on: a later request prunes the same image as apply_desap does
    assert server.alive()
    status, reply = after
    assert status == 200, reply
    want = expected("other", "saliency")
    _same_answer(server, reply, want)
    assert [r.indices.tolist() for r in after_records] == want["indices"]
