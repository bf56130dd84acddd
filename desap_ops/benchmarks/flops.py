"""FLOPs as ``torch.utils.flop_counter`` counts them, for ``desap bench e2e``: formulas for SDPA's
CPU kernel and the matrix-vector product (which torch leaves uncounted); :class:`ShapesOnly`,
which counts a full-size forward pass on a CPU in little memory; and the count of every variant's
prefill at each budget, from the pieces (:func:`piecewise_flops`, the LLaVA-1.5 and LLaVA-NeXT
layouts, on a meta copy) or from the real forward passes (:func:`forward_flops`, the Qwen and video
models, whose forward reads token ids)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from desap_ops import ops
from desap_ops.integrations.common.sequence import image_budget
from desap_ops.methods import MethodInputs, Signal, TokenGrid, get_method, run_method
from desap_ops.received import received_attention

from .e2e_batch import QWEN, TEXT_TOKENS, Batch
from .e2e_variants import Baseline, prefill, tower_call, variant
from .skeleton import optional

# a method reading one of these projects every visual token (LLaVA's projector), not only the kept
# ones, once per signal read
PROJECTS_ALL = frozenset({Signal.ATTN, Signal.PROJECTED})
# and one of these runs the received-attention op over every crop's tokens, once per block read
RECEIVES = frozenset({Signal.RECEIVED, Signal.LAYER_RECEIVED})
KEY_WIDTH = 64   # the keys a method reads (Signal.KEYS): a head's width, CLIP ViT-L/14's (LLaVA's tower)

# torch counts no FLOPs for SDPA's CPU kernel (it does for the CUDA ones): the same count as theirs
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


# nor for a matrix-vector product (DivPrune's greedy steps): 2 FLOPs per element of the matrix
if torch.ops.aten.mv not in flop_registry:
    @register_flop_formula(torch.ops.aten.mv)
    def _mv_flops(matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * matrix_shape[0] * matrix_shape[1]


class ShapesOnly(TorchDispatchMode):
    """Every op the FLOP counter counts (the matrix products, convolutions and attention of torch)
    runs on meta copies of its inputs and gives zeros of its output's shape and strides: inside a
    ``FlopCounterMode`` a forward pass is counted exactly while the rest of it (token ids, grids,
    positions, indexing, elementwise work and DeSAP's own op) runs as it is, at a small share of
    the cost. With :func:`desap_ops.testing.real_shapes.build_real_shape`'s ``weights=False`` this
    counts a full-size model whose forward reads token ids (Qwen, video) on a CPU in little memory."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "aten" or func.overloadpacket not in flop_registry:
            return func(*args, **kwargs)
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        out = func(*meta_args, **meta_kwargs)
        zeros = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_()  # noqa: E731
        return tree_map_only(torch.Tensor, zeros, out)


def flops_of(fn: Callable[[], object], shapes_only: bool = False) -> int:
    """FLOPs ``torch.utils.flop_counter`` counts in one call of ``fn`` (DeSAP's op included);
    ``shapes_only``: under :class:`ShapesOnly` (the same count, none of the matrix work)."""
    with FlopCounterMode(display=False) as counter:
        if shapes_only:
            with ShapesOnly():
                fn()
        else:
            fn()
    return int(counter.get_total_flops())


# --- every variant of one prefill ----------------------------------------------------------------------

@dataclass
class Pieces:
    """FLOPs of a prefill's pieces, where they are counted apart."""
    operator: Optional[int] = optional()          # DeSAP's op (LLaVA layouts)
    vision_tower: Optional[int] = optional()      # the tower (LLaVA layouts), the encoder with its mergers (Qwen)
    language_full: Optional[int] = optional()     # the language model on the full prompt (LLaVA layouts)
    language_keep: Optional[int] = optional()     # ... on the pruned prompt


@dataclass
class PrefillFlops:
    """FLOPs of one prefill of each variant at one budget."""
    full: int
    ideal: int
    methods: dict[str, int]     # each pruning method's prefill, DeSAP first
    pieces: Pieces


def method_flops(name: str, batch: int, visual: int, width: int, text_width: int, kept: int,
                 key_width: int = KEY_WIDTH) -> int:
    """FLOPs of the pruning method ``name`` choosing ``kept`` of ``visual`` tokens per image and
    merging the others or not, as the method does by default (``run_method``, ``Method.merges``:
    what ``apply_desap(method=name)`` runs), counted on a CPU on random signals of the shapes the
    LLaVA layouts give it (matrix work depends on the shapes alone): hidden (batch, visual, width),
    the attention branch and the projected rows in the text's space, TEXT_TOKENS of text and keys
    of ``key_width`` (a head's width) where the method reads them."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(0)
    signal = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    reads = method.reads
    inputs = MethodInputs(
        hidden=signal(batch, visual, width), keep=kept,
        saliency=signal(batch, visual).softmax(-1) if Signal.SALIENCY in reads else None,
        attn=signal(batch, visual, text_width) if Signal.ATTN in reads else None,
        text=signal(batch, TEXT_TOKENS, text_width) if Signal.TEXT in reads else None,
        text_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.bool) if Signal.TEXT in reads else None,
        seed=torch.arange(batch, dtype=torch.long) if Signal.SEED in reads else None,
        projected=signal(batch, visual, text_width) if Signal.PROJECTED in reads else None,
        keys=signal(batch, visual, key_width) if Signal.KEYS in reads else None,
        received=signal(batch, visual).softmax(-1) if Signal.RECEIVED in reads else None,
        layer_received=signal(batch, visual).softmax(-1) if Signal.LAYER_RECEIVED in reads else None,
        grid=TokenGrid(((1, 1, visual),)))   # one row: the work depends on the shapes alone
    return flops_of(lambda: run_method(method, inputs, merge=method.merges))


def piecewise_flops(model: nn.Module, inputs: dict, image_tokens: int, keep: int, newlines: int,
                    methods: Sequence[str]) -> PrefillFlops:
    """FLOPs of the full, the ideal and each method's prefill of LLaVA-1.5 / LLaVA-NeXT from the
    pieces (runs on meta). An image sends the language model ``sequence.image_budget``
    placeholders, its ``newlines`` (LLaVA-NeXT) among them; the projector projects only the visual
    tokens: all of them (DeSAP, and a method that reads the attention branch or the projected
    rows), then the kept ones
    (every variant keeps as many). ``methods``: DeSAP first, whose own work is its operator
    (``ops.prune_flops``), then the others, whose work is counted on their signals
    (:func:`method_flops`)."""
    inner = model.model
    vision = model.config.vision_config
    pixels = inputs["pixel_values"]
    crops = pixels.shape[0] * (pixels.shape[1] if pixels.dim() == 5 else 1)
    batch = inputs["input_ids"].shape[0]
    width, text_width = vision.hidden_size, model.config.text_config.hidden_size
    rows = lambda n, w=width: torch.empty(batch, n, w, device=pixels.device, dtype=pixels.dtype)  # noqa: E731
    per_crop = (vision.image_size // vision.patch_size) ** 2
    sent = image_budget(keep, image_tokens, newlines)       # placeholders per image after pruning
    visual, kept = image_tokens - newlines, sent - newlines   # visual tokens per image: all, kept

    tower = flops_of(tower_call(model, inputs))
    project_all = flops_of(lambda: inner.multi_modal_projector(rows(crops // batch * per_crop)))
    project_kept = flops_of(lambda: inner.multi_modal_projector(rows(kept)))
    operator = ops.prune_flops((batch, visual, width), (batch, visual, text_width),
                               (batch, TEXT_TOKENS, text_width), None, None, None, kept)
    length_full = inputs["input_ids"].shape[1]
    language_full, language_keep = (flops_of(lambda: model(inputs_embeds=rows(n, text_width), logits_to_keep=1))
                                    for n in (length_full, length_full - image_tokens + sent))
    ideal = tower + project_kept + language_keep
    desap, *others = methods
    counted = {desap: ideal + project_all + operator}
    heads = vision.num_attention_heads
    head_width = width // heads
    # the received attention of one block over every crop's tokens ([CLS] included), as the op runs it
    tokens = per_crop + 1
    block = lambda: torch.empty(crops * tokens, heads, head_width, device=pixels.device)  # noqa: E731
    received = flops_of(lambda: received_attention(block(), block(), list(range(0, crops * tokens + 1, tokens)), 1.0))
    # the projector runs on all the visual tokens once per signal read through it (branch, rows)
    counted.update({name: ideal + method_flops(name, batch, visual, width, text_width, kept, head_width)
                    + project_all * len(get_method(name).reads & PROJECTS_ALL)
                    + received * len(get_method(name).reads & RECEIVES) for name in others})
    return PrefillFlops(full=tower + project_all + language_full, ideal=ideal, methods=counted,
                        pieces=Pieces(operator, tower, language_full, language_keep))


def forward_flops(model: nn.Module, family: str, data: Batch, keeps: list[int], shapes_only: bool,
                  methods: Sequence[str]) -> list[PrefillFlops]:
    """FLOPs of the real forward passes of every variant at each budget (the Qwen and video models,
    whose forward reads token ids); the Qwen encoder (mergers included) counted apart."""
    full = flops_of(prefill(model, data.inputs), shapes_only)
    tower = None
    if family in QWEN:
        pixels, grid = data.inputs["pixel_values"], data.inputs["image_grid_thw"]
        tower = flops_of(lambda: model.model.get_image_features(pixels, grid), shapes_only)

    def counted(name: str, keep: int) -> int:
        with variant(model, name, keep):
            return flops_of(prefill(model, data.inputs), shapes_only)

    return [PrefillFlops(full=full, ideal=counted(Baseline.IDEAL, keep),
                         methods={name: counted(name, keep) for name in methods}, pieces=Pieces(vision_tower=tower))
            for keep in keeps]
