"""DeSAP in vLLM's Qwen3.5 (dense and MoE), against transformers with apply_desap on the same
checkpoint, both in bfloat16: vLLM's CPU build runs Qwen3.5's linear attention in bfloat16 only, and
the two implementations' bfloat16 arithmetic differs in the last bits (the vision tower's attention,
norms and rotary), so DeSAP's scores differ there too, and where two tokens nearly tie the two
keep different ones. Compared exactly: the prompt ids (a video's span as in ``test_vllm_qwen3_vl``,
whose count of kept tokens is the budget's), the class, the ranks' agreement under tensor
parallelism. At bfloat16 tolerance: each item's kept tokens (most shared with transformers'), and
vLLM's own Qwen3.5 without ``desap`` (transformers, fed vLLM's greedy tokens, ranks each within
``TOLERANCE`` of its best logit). The positions' and the DeepStack-free embeddings' path is
Qwen3-VL's, tested exactly in float32 there.

The tiny checkpoint's word-level tokenizer loads as transformers' ``Qwen3_5Tokenizer``, a byte-level
BPE that rebuilds it and reads few of its words (and none of the timestamps): vLLM and transformers
load the same, so the ids still match, but a prompt's text holds fewer tokens than its words."""
import pytest

from engines import (qwen3_expected, qwen3_media, qwen3_requests, run_engine,
                     transformers_logits, transformers_run)

OPTIONS = {"keep": 6}
TOLERANCE = 0.05   # logits of a few units: a few bfloat16 steps
ENGINE = {"hf_overrides": {"desap": OPTIONS}, "limit_mm_per_prompt": {"image": 1, "video": 1}, "dtype": "bfloat16"}
WITHOUT = {key: value for key, value in ENGINE.items() if key != "hf_overrides"}
# the engines each test runs its job on (conftest.py starts them ahead)
ENGINES = {"test_images_and_videos_get_apply_desaps_prompt_ids_and_kept_tokens_at_bf16": [("qwen3_5", ENGINE)],
           "test_moe_under_tensor_parallelism_keeps_the_same_tokens_on_every_rank": [("qwen3_5_moe", ENGINE, 2)],
           "test_without_the_desap_key_vllm_runs_its_own_qwen3_5_within_tolerance": [("qwen3_5", WITHOUT)]}


@pytest.fixture(scope="module")
def media(checkpoints, tmp_path_factory):
    """The dense and MoE checkpoints (the session's) and the media (``engines.qwen3_media``)."""
    return {"qwen3_5": checkpoints["qwen3_5"], "qwen3_5_moe": checkpoints["qwen3_5_moe"],
            **qwen3_media(tmp_path_factory.mktemp("qwen3_5"))}


def _assert_greedy_within_tolerance(kind, folder, requests, outputs):
    """transformers (no DeSAP), fed each request's greedy tokens, ranks each near its best."""
    for out, (prompt, item) in zip(outputs, requests):
        item = item if isinstance(item, dict) else {"image": item}
        logits = transformers_logits(kind, folder, prompt, item, None, out["output_token_ids"])
        chosen = logits[range(len(logits)), out["output_token_ids"]]
        assert (chosen >= logits.max(dim=-1).values - TOLERANCE).all(), (chosen, logits.max(dim=-1))


def _assert_kept_tokens_within_tolerance(history, expected):
    """As many items, each keeping as many tokens as transformers' (the counts: the budgets), and
    at least half of all kept tokens found in transformers' choice for some item."""
    wanted = [indices for want in expected for indices in want["indices"]]
    assert len(history) == len(wanted)
    for record, want in zip(sorted(history, key=lambda r: len(r.indices)), sorted(wanted, key=len)):
        assert len(record.indices) == len(want)
    shared = sum(max(len(set(r.indices.tolist()) & set(w)) for w in wanted) for r in history)
    assert shared >= 0.5 * sum(map(len, wanted)), (history, wanted)


def test_images_and_videos_get_apply_desaps_prompt_ids_and_kept_tokens_at_bf16(media, tmp_path):
    folder, requests = media["qwen3_5"], qwen3_requests(media)
    expected = qwen3_expected("qwen3_5", folder, requests, OPTIONS)
    got = run_engine(tmp_path, folder, ENGINE, requests)
    assert [out["prompt_token_ids"] for out in got["rounds"][0]] == [want["prompt_ids"] for want in expected]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapQwen3_5ForConditionalGeneration"
    _assert_kept_tokens_within_tolerance(rank["history"], expected)


def test_moe_under_tensor_parallelism_keeps_the_same_tokens_on_every_rank(media, tmp_path):
    folder = media["qwen3_5_moe"]
    requests = qwen3_requests(media)[1:3]
    expected = qwen3_expected("qwen3_5_moe", folder, requests, OPTIONS)
    got = run_engine(tmp_path, folder, ENGINE, requests, tp=2)
    first, second = got["ranks"]
    assert first["class"] == "DesapQwen3_5MoeForConditionalGeneration"
    assert first["history"] == second["history"]
    assert [out["prompt_token_ids"] for out in got["rounds"][0]] == [want["prompt_ids"] for want in expected]
    _assert_kept_tokens_within_tolerance(first["history"], expected)


def test_without_the_desap_key_vllm_runs_its_own_qwen3_5_within_tolerance(media, tmp_path):
    folder = media["qwen3_5"]
    requests = qwen3_requests(media)[1:3]
    got = run_engine(tmp_path, folder, WITHOUT, requests)
    (rank,) = got["ranks"]
    assert rank["class"] == "Qwen3_5ForConditionalGeneration" and rank["history"] == []
    for out, (prompt, item) in zip(got["rounds"][0], requests):
        assert out["prompt_token_ids"] == transformers_run("qwen3_5", folder, prompt, item)["prompt_ids"]
    _assert_greedy_within_tolerance("qwen3_5", folder, requests, got["rounds"][0])
