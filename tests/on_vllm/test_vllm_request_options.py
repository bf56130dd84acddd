"""DeSAP options per request (``mm_processor_kwargs={"desap": {...}}``) and the engine's ``ideal``
option: in the processor (no engine), through ``LLM.generate`` and through ``vllm serve``, against
transformers with ``apply_desap`` at each request's own options."""
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import servers
import torch
from PIL import Image
from torch import nn

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
    ({"method": "no-such"}, r"""\]: method 'no-such' is not a registered pruning method; registered: \[.*'largest-norm'"""),
    ({"method": 3}, r"method must be a method name \(str\), got int 3"),
])
def test_a_bad_request_option_fails_in_the_processor_naming_it(checkpoints, desap, message):
    _, processor = _processor(checkpoints["llava"], ENGINE)
    with pytest.raises(ValueError, match=message):
        processor(PROMPTS[0], _items(processor, checkpoints["square"]), hf_processor_mm_kwargs={"desap": desap})


def test_the_method_is_part_of_the_images_hash_and_the_engine_limits_the_methods_a_request_may_ask_for(checkpoints):
    """No engine: one image and prompt under three methods is three cache entries (the hash vLLM's
    processor, encoder and prefix caches key on); asking for the engine's own method is asking for
    nothing. A method outside the engine's ``methods`` is refused by name."""
    _, processor = _processor(checkpoints["llava"], {**ENGINE, "methods": ["desap", "saliency", "largest-norm"]})
    items = _items(processor, checkpoints["square"])

    def process(desap=None):
        return processor(PROMPTS[0], items, hf_processor_mm_kwargs={"desap": desap} if desap else {})

    out = {method: process({"method": method}) for method in ("desap", "saliency", "largest-norm")}
    assert len({tuple(o["mm_hashes"]["image"]) for o in out.values()}) == 3
    assert process()["mm_hashes"] == out["desap"]["mm_hashes"]
    assert len({tuple(o["prompt_token_ids"]) for o in out.values()}) == 1   # the same placeholders
    for method, o in out.items():   # the method travels with the image to the model
        assert processor.desap_item(o["mm_kwargs"], "image", 0).method == method
    with pytest.raises(ValueError, match=r"""\["method"\] is 'divprune', which this engine does not allow; """
                                         r"""hf_overrides\["desap"\]\["methods"\] = \['desap', 'largest-norm', 'saliency'\]"""):
        process({"method": "divprune"})


def test_llm_generate_ideal_keeps_each_images_first_tokens_at_each_requests_keep(checkpoints, tmp_path):
    # the ideal engine: the same tower, each image keeps its first K tokens, unmerged (K per request)
    folder, image = checkpoints["llava"], checkpoints["square"]
    asked = [None, {"keep": 3}, {"keep": 10, "task_ratio": "auto"}]
    requests = [(PROMPTS[0], {"image": image, **({"mm_processor_kwargs": {"desap": a}} if a else {})})
                for a in asked]
    got = run_engine(tmp_path, folder, {"hf_overrides": {"desap": {**ENGINE, "ideal": True}}}, requests,
                     watch=("ideal_probe:watch_pruning_work", "ideal_probe:pruning_work"))
    keeps = [ENGINE["keep"], 3, 10]
    (rank,) = got["ranks"]
    assert rank["class"] == "DesapLlavaForConditionalGeneration"
    # no pruning work: no saliency read, no text embedded, in calls that did run
    (work,) = got["watched"]
    assert work["cls_saliency"] == work["merged_saliency"] == 0
    assert work["text_widths"] and set(work["text_widths"]) == {0}
    assert sorted(r.indices.tolist() for r in rank["history"]) == sorted(list(range(k)) for k in keeps)
    for record in rank["history"]:
        keep = len(record.indices)
        assert record.assignment.tolist() == list(range(keep)) + [-1] * (16 - keep)   # nothing merged
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


class _Attention(nn.Module):   # vLLM's CLIP attention as read_vllm_tower reads it: a fused qkv_proj
    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(8, 24)

    def forward(self, x):
        return self.qkv_proj(x)[..., :8]


class _ClipTower(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.Module()
        layer.self_attn = _Attention()
        self.vision_model = nn.Module()
        self.vision_model.encoder = nn.Module()
        self.vision_model.encoder.layers = nn.ModuleList([layer])
        self.vision_model.config = SimpleNamespace(num_hidden_layers=1)   # vLLM's: the whole tower's depth

    def forward(self, pixel_values, feature_select_strategy=None):
        return pixel_values + self.vision_model.encoder.layers[-1].self_attn(pixel_values)


class _QwenAttention(nn.Module):   # vLLM's Qwen vision attention: its backend gets query and key by name
    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.forward = lambda query, key: query
        self.attn.scale = 1.0
        self.num_attention_heads_per_partition, self.tp_size = 1, 1

    def forward(self, x):
        return self.attn(query=x[None, :, None], key=x[None, :, None])[0, :, 0]


class _QwenVisual(nn.Module):
    spatial_merge_unit = 4

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.attn = _QwenAttention()
        self.blocks = nn.ModuleList([block])
        self.merger = nn.Identity()

    def prepare_encoder_metadata(self, grid_thw):
        return {}

    def forward(self, pixels, grid_thw, encoder_metadata):
        return pixels + self.blocks[-1].attn(pixels)


def test_the_ideal_runs_each_tower_plainly_and_embeds_no_text(monkeypatch):
    """No engine: for a method that reads no signal (the ideal's ``first``) vLLM's tower readers run
    the tower with no hook, and ``desap_texts`` embeds nothing; for DeSAP each reads its signals
    (refused here)."""
    from desap_ops.integrations.vllm import qwen_tower, tower
    from desap_ops.integrations.vllm.model import DesapModelMixin

    class Refused(AssertionError):
        pass

    def refuse(*args, **kwargs):
        raise Refused

    monkeypatch.setattr(tower, "cls_saliency", refuse)
    monkeypatch.setattr(qwen_tower, "merged_saliency", refuse)
    clip, pixels = _ClipTower(), torch.randn(2, 5, 8)
    with pytest.raises(Refused):
        tower.read_vllm_tower(clip, pixels, drop_cls=True)
    signals = tower.read_vllm_tower(clip, pixels, drop_cls=True, reads=frozenset())
    assert signals.attn is None and signals.saliency is None
    torch.testing.assert_close(signals.hidden, clip(pixels)[:, 1:])
    attention = clip.vision_model.encoder.layers[-1].self_attn
    assert not attention._forward_hooks and not attention.qkv_proj._forward_hooks   # none left behind

    visual, patches = _QwenVisual(), torch.randn(16, 4)
    with pytest.raises(Refused):
        qwen_tower.read_qwen_tower(visual, patches, [[1, 4, 4]])
    signals = qwen_tower.read_qwen_tower(visual, patches, [[1, 4, 4]], reads=frozenset())
    assert signals.attn is None and signals.saliency is None
    torch.testing.assert_close(signals.hidden, visual(patches, [[1, 4, 4]], {}))

    language_model = nn.Linear(3, 6)
    language_model.embed_input_ids = refuse
    engine = SimpleNamespace(get_language_model=lambda: language_model,
                             config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(hidden_size=6)))
    ids = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    with pytest.raises(Refused):
        DesapModelMixin.desap_texts(SimpleNamespace(**vars(engine)), ids, frozenset({"text"}))
    texts, mask = DesapModelMixin.desap_texts(SimpleNamespace(**vars(engine)), ids, frozenset())
    assert texts.shape == (2, 0, 6) and mask.shape == (2, 0) and texts.dtype == language_model.weight.dtype
