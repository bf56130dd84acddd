"""``random``'s seed in vLLM's Qwen classes, whose tower normalizes the raw 8-bit pixels on the
device: transformers' Qwen processor (raw and normalized, as each engine gets them) and vLLM's own
fused normalization give every patch row the same order hash (``methods.order_rows``), over all 256
levels of each channel. No engine: the processors and the normalization module alone."""
import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessor
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.fusion.mm_input_norm import FusedMMInputNorm

from desap_ops.methods import order_rows

# the published checkpoints' (and the tiny ones') statistics: Qwen2.5-VL the processor's defaults, the Qwen3 generation 0.5
STATISTICS = {"qwen2.5-vl": {}, "qwen3": {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}}


@pytest.mark.parametrize("family", STATISTICS)
def test_raw_processor_and_device_normalized_pixels_give_the_same_order_hash(family):
    processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, **STATISTICS[family])
    rng = np.random.default_rng(12)
    # every level in each channel, in another order per channel
    image = np.stack([rng.permutation(np.arange(112 * 112) % 256) for _ in range(3)], axis=-1)
    image = image.reshape(112, 112, 3).astype("uint8")
    normalized = processor(images=[image], return_tensors="pt")["pixel_values"]
    # what vLLM's processor ships when the tower normalizes on the device
    raw = processor(images=[image], return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    assert raw.dtype == torch.uint8 and normalized.dtype == torch.float32
    levels = raw.view(raw.shape[0], 3, -1)
    assert all(levels[:, c].unique().numel() == 256 for c in range(3))
    with set_current_vllm_config(VllmConfig()):
        device_norm = FusedMMInputNorm(processor.image_mean, processor.image_std, processor.rescale_factor)
    on_device = device_norm.forward_native(raw, torch.float32)
    hashes = order_rows(raw, 3)
    assert torch.equal(order_rows(normalized, 3), hashes)   # the two formulas may differ in last bits, not in order
    assert torch.equal(order_rows(on_device, 3), hashes)
