"""The test and bench models of desap_ops.testing: the real shapes as published, built in one place
with their constructors' buffers and random weights, the same builder behind both benches' tables."""
import pytest
import torch
import transformers

from desap_ops.testing import real_shapes, vllm_models
from desap_ops.testing.models import MODELS, build_model, model_config
from desap_ops.testing.real_shapes import CLASSES, weight_bytes


def test_llava_1_5_7b_has_its_parameter_count():
    weights = weight_bytes(build_model("llava-1.5-7b", "meta", torch.bfloat16))
    assert 7.0e9 * 2 < weights < 7.1e9 * 2            # LLaVA-1.5-7B: 7.06 billion parameters in bf16


def test_qwen3_vl_8b_has_the_published_shape():
    model = build_model("qwen3-vl-8b", "meta", torch.bfloat16)
    assert 8.76e9 < sum(p.numel() for p in model.parameters()) < 8.78e9    # 8.77 billion parameters
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.patch_size, vision.out_hidden_size) == \
        (27, 1152, 16, 16, 4096)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24] and len(model.model.visual.deepstack_merger_list) == 3
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.head_dim, text.vocab_size) == (4096, 36, 32, 8, 12288, 128, 151936)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["rope_theta"] == 5e6
    zero = build_model("qwen3-vl-8b", "cpu", torch.bfloat16, shrink=True, weights=False)
    assert all(p.stride() == (0,) * p.dim() and not p.any() for p in zero.parameters())


@pytest.mark.parametrize("name,e2e_name", [("llava-tinyllama-1.1b", "llava-tinyllama-1.1b"),
                                            ("llava-1.5-7b", "llava-1.5-7b")])
def test_the_vllm_benches_build_the_same_model_as_the_e2e_bench(name, e2e_name):
    """One builder: the vLLM benches' checkpoint of a real shape is the e2e bench's model in bf16."""
    served = dict(vllm_models.MODELS[name].build("meta").named_parameters())
    timed = dict(build_model(e2e_name, "meta", torch.bfloat16).named_parameters())
    assert {k: (v.shape, v.dtype) for k, v in served.items()} == {k: (v.shape, v.dtype) for k, v in timed.items()}


def test_the_vllm_benches_image_tokens():
    counts = {name: vllm_models.image_tokens(model, model.config()) for name, model in vllm_models.MODELS.items()}
    assert counts == {"llava-tinyllama-1.1b": 576, "llava-1.5-7b": 576, "qwen2.5-vl-small": 144, "tiny": 16,
                      "tiny-qwen2.5-vl": 16}
    small = real_shapes.build_real_shape(real_shapes.qwen2_5_vl_small(), "meta", torch.bfloat16)
    assert 0.55e9 < sum(p.numel() for p in small.parameters()) < 0.65e9   # 8 tower blocks + a 0.5B-class LM


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, spec in MODELS.items() if not spec.tiny])
def test_real_shapes_build_with_the_constructors_buffers_and_random_weights(name):
    model = build_model(name, "cpu", torch.float32, shrink=True)
    reference = getattr(transformers, CLASSES[MODELS[name].family])(model_config(name, shrink=True))
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys() and buffers
    for key, buffer in buffers.items():
        assert buffer.dtype == expected[key].dtype and torch.equal(buffer, expected[key]), key
    stds = [p.std().item() for p in model.parameters() if p.numel() > 1]
    assert min(stds) > 0.015 and max(stds) < 0.025      # every parameter drawn from N(0, 0.02)


@pytest.mark.parametrize("name,factor,tower,language,roles", [
    ("qwen2.5-vl-7b", 4, 8, 7, {"fullatt_block_indexes": [1, 3, 5, 7]}),           # every 8th of 32: every 2nd of 8
    ("qwen3-vl-8b", 9, 3, 4, {"deepstack_visual_indexes": [0, 1, 2]}),             # blocks 8, 16, 24 of 27
    ("llava-1.5-7b", 8, 3, 4, {}),
])
def test_a_depth_factor_divides_both_depths_and_keeps_the_roles_in_proportion(name, factor, tower, language, roles):
    config = model_config(name, depth_factor=factor)
    assert real_shapes.depths(config) == (tower, language)
    full = model_config(name)
    assert (config.vision_config.hidden_size, config.text_config.hidden_size) == \
        (full.vision_config.hidden_size, full.text_config.hidden_size)
    for field, expected in roles.items():
        assert list(getattr(config.vision_config, field)) == expected
    model = build_model(name, "meta", torch.bfloat16, depth_factor=factor)
    assert type(model).__name__ == CLASSES[config.model_type]


def test_a_depth_factor_that_does_not_divide_both_depths_is_refused():
    with pytest.raises(ValueError, match=r"divide the tower's 27 blocks and the language model's 36 layers, got 4"):
        model_config("qwen3-vl-8b", depth_factor=4)
    with pytest.raises(ValueError, match="real shapes, not to the tiny model tiny"):
        build_model("tiny", "cpu", torch.float32, depth_factor=2)
