"""The registry: which models apply_desap patches, how options are checked, the public record."""
import functools
import inspect

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from desap_ops.testing.tiny import (QWEN_IMAGE, tiny_llava, tiny_llava_next, tiny_llava_next_video, tiny_qwen2_5_vl,
                                  tiny_qwen3_5, tiny_qwen3_vl, tiny_video_llava)
from desap_ops.integrations import SUPPORTED, PruneRecord, apply_desap, image_token_counts, last_prune, remove_desap
from desap_ops.integrations.hf import compat
from desap_ops.integrations.hf.registry import FAMILIES

from ..prompts import N, llava_pixels, llava_prompt

# a tiny model of every class a patcher may be registered for (a registered class without one fails below)
TINY = {
    "LlavaForConditionalGeneration": tiny_llava,
    "LlavaNextForConditionalGeneration": tiny_llava_next,
    "Qwen2_5_VLForConditionalGeneration": tiny_qwen2_5_vl,
    "Qwen3VLForConditionalGeneration": tiny_qwen3_vl,
    "Qwen3VLMoeForConditionalGeneration": functools.partial(tiny_qwen3_vl, moe=True),
    "Qwen3_5ForConditionalGeneration": tiny_qwen3_5,
    "Qwen3_5MoeForConditionalGeneration": functools.partial(tiny_qwen3_5, moe=True),
    "LlavaNextVideoForConditionalGeneration": tiny_llava_next_video,
    "VideoLlavaForConditionalGeneration": tiny_video_llava,
}


def _instance_attributes(model):
    return {"model": dict(model.__dict__), "model.model": dict(model.model.__dict__)}


@pytest.mark.parametrize("name", SUPPORTED)
def test_each_registered_class_has_hooks_that_resolve_and_a_patch_that_installs_and_uninstalls(name):
    """On the installed transformers: the class exists, every internal its patch uses is there with
    the parameters it passes, every method the patch replaces is among those checked internals (so
    a release that moves one is refused before patching, never patched past), and remove_desap
    leaves the model's instance attributes exactly as they were."""
    assert name in FAMILIES and hasattr(transformers, name)
    model = TINY[name]()
    assert type(model).__name__ == name
    compat.check_hooks(model, FAMILIES[name].hooks)
    before = _instance_attributes(model)
    apply_desap(model, keep=4)
    owners = {id(model): "model", id(model.model): "model.model"}
    replaced = {f"{owners[id(saved.owner)]}.{saved.name}" for saved in model._desap.patch.saved}
    assert {"model.forward", "model.generate"} <= replaced
    assert replaced <= {hook.target for hook in FAMILIES[name].hooks}
    for saved in model._desap.patch.saved:   # an instance attribute that shows the signature of what it shadows
        patched, original = saved.owner.__dict__[saved.name], model._desap.patch.originals[saved.name]
        assert inspect.signature(patched) == inspect.signature(original)
    remove_desap(model)
    after = _instance_attributes(model)
    assert after.keys() == before.keys()
    for owner in before:
        assert after[owner].keys() == before[owner].keys()
        assert all(after[owner][key] is before[owner][key] for key in before[owner])


def test_an_unsupported_model_is_refused_naming_the_supported_classes():
    tiny_lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=32))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration") as refused:
        apply_desap(tiny_lm, keep=4)
    assert all(name in str(refused.value) for name in SUPPORTED)
    assert "forward" not in tiny_lm.__dict__ and not hasattr(tiny_lm, "_desap")
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        image_token_counts(tiny_qwen2_5_vl(), torch.zeros(4, 3 * 2 * 14 * 14))


@pytest.mark.parametrize("options, error, name", [
    (dict(keep="4"), TypeError, "keep"),
    (dict(keep=0), ValueError, "keep"),
    (dict(keep=4, task_ratio=float("nan")), ValueError, "task_ratio"),
    (dict(keep=4, task_ratio="half"), TypeError, "task_ratio"),
    (dict(keep=4, merge="yes"), TypeError, "merge"),
    (dict(keep=4, text_reduce="sum"), ValueError, "text_reduce"),
    (dict(keep=4, backend="cuda"), ValueError, "backend"),
    (dict(keep=4, task_ratio="Auto"), TypeError, "task_ratio"),
    (dict(keep=4, text_budget=0), ValueError, "text_budget"),
    (dict(keep=4, text_budget=2.5), TypeError, "text_budget"),
    (dict(keep=4, text_budget=True), TypeError, "text_budget"),
    (dict(keep=4, ideal="yes"), TypeError, "ideal"),
])
def test_options_are_checked_when_applied(options, error, name):
    model = tiny_llava()
    with pytest.raises(error, match=name):
        apply_desap(model, **options)
    assert not hasattr(model, "_desap")


def test_applying_twice_replaces_the_first():
    model = tiny_llava()
    ids, pixels = torch.tensor([llava_prompt([5], 1, [7, 8])]), llava_pixels()[:1]
    assert last_prune(model) is None
    apply_desap(model, keep=3)
    apply_desap(model, keep=5)
    out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape[1] == ids.shape[1] - (N - 5)
    (record,) = last_prune(model)
    assert isinstance(record, PruneRecord) and len(record.indices) == 5 and record.method == "desap"
    assert [len(t) for t in (record.assignment, record.task_scores, record.saliency)] == [N] * 3
    assert record.task_keep == 3   # floor(0.5 * 5 + 0.5)
    remove_desap(model)   # once undoes it all: the first patch did not stay underneath
    assert "forward" not in model.__dict__ and "get_image_features" not in model.model.__dict__
    assert last_prune(model) is None


def _subclass_twin(model):
    """An instance of a new subclass of ``model``'s class (adding nothing), with its config and weights."""
    twin = type("My" + type(model).__name__, (type(model),), {})(model.config).eval()
    twin.load_state_dict(model.state_dict())
    assert type(twin).__name__ not in SUPPORTED
    return twin


def test_a_subclass_of_a_supported_class_is_patched_as_that_class():
    base = tiny_llava()
    sub = _subclass_twin(base)
    ids, pixels = torch.tensor([llava_prompt([5], 1, [7, 8])]), llava_pixels()[:1]
    for model in (base, sub):
        apply_desap(model, keep=4)
    assert torch.equal(sub(input_ids=ids, pixel_values=pixels).logits,
                       base(input_ids=ids, pixel_values=pixels).logits)
    assert image_token_counts(sub, pixels) == [N]


def test_a_qwen_subclass_generates_like_the_class():
    base = tiny_qwen2_5_vl()
    sub = _subclass_twin(base)
    pixels = torch.randn(8 * 8, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 5, 153] + [QWEN_IMAGE] * 16 + [154, 7, 8]])
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 8, 8]]),
                  mm_token_type_ids=(ids == QWEN_IMAGE).int())
    outputs = [apply_desap(model, keep=4).generate(**inputs, max_new_tokens=3, do_sample=False)
               for model in (base, sub)]
    assert torch.equal(outputs[0], outputs[1])


def test_image_token_counts_of_the_llava_image_paths():
    sizes = torch.tensor([[56, 112], [112, 112]])
    assert image_token_counts(tiny_llava(), llava_pixels()) == [N, N]
    assert image_token_counts(tiny_llava_next(), torch.zeros(2, 5, 3, 56, 56), sizes) == [52, 88]
    assert image_token_counts(tiny_llava_next_video(), torch.zeros(2, 5, 3, 56, 56), sizes) == [52, 88]
