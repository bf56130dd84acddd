"""DeSAP options per request (``mm_processor_kwargs={"desap": {...}}``) and the engine's ``ideal``
option: in the processor (no engine), through ``LLM.generate`` and through ``vllm serve``, against
transformers with ``apply_desap`` at each request's own options."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import servers
from PIL import Image

from engines import PROMPTS, QWEN_PROMPTS, run_engine, transformers_run

# the engine's defaults (apply_desap's options) and its limit; the tiny LLaVA has 16 tokens an image
DEFAULTS = {"keep": 4, "task_ratio": 0.5}
ENGINE = {**DEFAULTS, "max_keep": 12}
QUESTION = "what is the color of the sky ?"
CHAT_PROMPT = f"USER: <image> {QUESTION} ASSISTANT:"   # what the chat template renders
# the engine of the LLM.generate test (conftest.py starts it ahead)
ENGINES = {"test_llm_generate_ideal_keeps_each_images_first_tokens_at_each_requests_keep":
           [("llava", {"hf_overrides": {"desap": {**ENGINE, "ideal": True}}})]}


def _processor(folder, desap):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from desap_ops.integrations.vllm import register

    register()   # what vLLM's plugin loader does in every process
    config = ModelConfig(model=str(folder), hf_overrides={"desap": desap}, max_model_len=512)
    return config, MULTIMODAL_REGISTRY.create_processor(config)


def _items(processor, image_file):
    return processor.info.parse_mm_data({"image": Image.open(image_file).convert("RGB")})


@pytest.mark.parametrize("kind, image, prompt, token, keep, placeholders, by_default", [
    ("llava", "square", PROMPTS[0], "image_token_index", 10, 10, 4),             # 16 tokens
    ("llava_next", "wide", PROMPTS[0], "image_token_index", 12, 12, 5),          # 48 visual + 4 newlines
    ("qwen2_5_vl", "large", QWEN_PROMPTS[0], "image_token_id", 9, 9, 4),         # 16 tokens
    ("qwen2_5_vl", "square", QWEN_PROMPTS[0], "image_token_id", 9, 4, 4),        # 4 tokens: whole
])
def test_a_requests_keep_sets_its_placeholders_hash_and_the_options_its_image_carries(
        checkpoints, monkeypatch, kind, image, prompt, token, keep, placeholders, by_default):
    config, processor = _processor(checkpoints[kind], ENGINE)
    image_token = getattr(config.hf_config, token)
    seen = []   # every kwargs the Hugging Face processor is built or called with
    get_hf_processor, call = processor.info.get_hf_processor, processor._call_hf_processor
    monkeypatch.setattr(processor.info, "get_hf_processor", lambda **kw: seen.append(kw) or get_hf_processor(**kw))
    monkeypatch.setattr(processor, "_call_hf_processor", lambda data, kw: seen.append(kw) or call(data, kw))
    items = _items(processor, checkpoints[image])
    default = processor(prompt, items)
    asked = processor(prompt, items, hf_processor_mm_kwargs={"desap": {"keep": keep, "task_ratio": "auto"}})

    assert asked["prompt_token_ids"].count(image_token) == placeholders
    assert default["prompt_token_ids"].count(image_token) == by_default   # the engine's keep
    assert asked["mm_hashes"]["image"] != default["mm_hashes"]["image"]   # two cache entries, never one
    # the options the model will prune this image with: the request's over the engine's
    options = processor.desap_item(asked["mm_kwargs"], "image", 0)
    assert (options.keep, options.task_ratio, options.max_keep) == (keep, "auto", ENGINE["max_keep"])
    assert processor.desap_item(default["mm_kwargs"], "image", 0) == processor.desap
    assert seen and not any("desap" in kwargs for kwargs in seen)


def test_the_processor_cache_keeps_each_requests_budget_apart(checkpoints):
    from vllm.multimodal.cache.base import MultiModalProcessorOnlyCache

    config, processor = _processor(checkpoints["llava"], ENGINE)
    cache = MultiModalProcessorOnlyCache(config)
    items = _items(processor, checkpoints["square"])
    counts = [processor(PROMPTS[0], items, hf_processor_mm_kwargs={"desap": {"keep": k}}, cache=cache)
              ["prompt_token_ids"].count(config.hf_config.image_token_index) for k in (6, 10, 6, 10)]
    assert counts == [6, 10, 6, 10]   # the repeats come from the cache, each with its own count


@pytest.mark.parametrize("desap, message", [
    ({"keep": 13}, r'\["keep"\] is 13, above the most this engine allows, hf_overrides\["desap"\]\["max_keep"\] = 12'),
    ({"ratio": 0.5}, r"unknown option\(s\) \['ratio'\]"),
    ({"ideal": True}, r"sets \['ideal'\], which only the engine sets"),
])
def test_a_bad_request_option_fails_in_the_processor_naming_it(checkpoints, desap, message):
    _, processor = _processor(checkpoints["llava"], ENGINE)
    with pytest.raises(ValueError, match=message):
        processor(PROMPTS[0], _items(processor, checkpoints["square"]), hf_processor_mm_kwargs={"desap": desap})


def test_llm_generate_ideal_keeps_each_images_first_tokens_at_each_requests_keep(checkpoints, tmp_path):
    # the ideal engine: the same tower, each image keeps its first K tokens, unmerged (K per request)
    folder, image = checkpoints["llava"], checkpoints["square"]
    asked = [None, {"keep": 3}, {"keep": 10, "task_ratio": "auto"}]
    requests = [(PROMPTS[0], {"image": image, **({"mm_processor_kwargs": {"desap": a}} if a else {})})
                for a in asked]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": {**ENGINE, "ideal": True}}}, requests)
    keeps = [ENGINE["keep"], 3, 10]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapLlavaForConditionalGeneration"
    assert sorted(r["indices"] for r in rank["history"]) == sorted(list(range(k)) for k in keeps)
    for record in rank["history"]:
        keep = len(record["indices"])
        assert record["assignment"] == list(range(keep)) + [-1] * (16 - keep)   # nothing merged
    for out, keep in zip(got["rounds"][0], keeps):
        # transformers' ideal: apply_desap(ideal=True) at the request's keep; its prompt is DeSAP's at that keep
        want = transformers_run("llava", folder, PROMPTS[0], image, {**DEFAULTS, "keep": keep, "ideal": True})
        desap = transformers_run("llava", folder, PROMPTS[0], image, {**DEFAULTS, "keep": keep}, max_tokens=1)
        assert want["indices"] == [list(range(keep))]
        assert out["prompt_token_ids"] == desap["prompt_ids"] == want["prompt_ids"]
        assert out["output_token_ids"] == want["output_ids"]


def _chat(folder, image, desap=None) -> dict:
    body = servers.chat_body(folder, image, QUESTION)
    return {**body, "mm_processor_kwargs": {"desap": desap}} if desap is not None else body


@pytest.mark.parametrize("server", ["llava"], indirect=True)
def test_vllm_serve_two_concurrent_requests_with_their_own_keep_match_apply_desap_and_bad_ones_get_400(
        server, checkpoints):
    # the session's shared LLaVA server (servers.py): keep 6 by default, at most 12 a request
    folder, image, defaults = server.folder, checkpoints["square"], server.options
    limit = servers.OPTIONS["llava"]["max_keep"]
    asked = [{"keep": 4}, {"keep": 10, "task_ratio": "auto"}]
    bad = [({"keep": limit + 1}, f'[\\"keep\\"] is {limit + 1}, above the most this engine allows'),
           ({"task_ratio": 2}, "task_ratio must lie in [0, 1], got 2.0"),
           ({"ratio": 0.5}, "unknown option(s) ['ratio']"),
           ({"max_keep": 64}, "sets ['max_keep'], which only the engine sets")]
    server.fresh()
    with ThreadPoolExecutor(2) as pool:   # one image, two budgets, at once; then again, from the caches
        replies = list(pool.map(lambda a: servers.send(server.url, _chat(folder, image, a)), asked * 2))
    refused = [servers.send(server.url, _chat(folder, image, desap)) for desap, _ in bad]
    after = servers.send(server.url, _chat(folder, image))   # the engine's own keep

    for (status, reply), (desap, message) in zip(refused, bad):
        assert status == 400 and message in reply["error"], (desap, status, reply)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    wants = [transformers_run("llava", folder, CHAT_PROMPT, image, {**defaults, **a}) for a in asked + [{}]]
    assert len({len(w["prompt_ids"]) for w in wants}) == 3
    # the answers tell the options apart: the request's task_ratio reached the model, not only its keep
    engines_ratio = transformers_run("llava", folder, CHAT_PROMPT, image, {**defaults, "keep": 10})
    assert len({tuple(w["output_ids"]) for w in (wants[0], wants[1], engines_ratio)}) == 3
    for (status, reply), want in zip(replies + [after], wants[:2] * 2 + wants[2:]):
        assert status == 200, reply
        assert reply["usage"]["prompt_tokens"] == len(want["prompt_ids"])
        answer = reply["choices"][0]["message"]["content"].split()
        assert answer == tokenizer.decode(want["output_ids"], skip_special_tokens=True).split() and answer
