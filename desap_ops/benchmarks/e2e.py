"""``desap bench e2e``: prefill of a whole model with and without DeSAP, for every model in
:data:`desap_ops.testing.models.MODELS` (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video,
Video-LLaVA).

For each budget K three prefills of the same model on the same batch (per row: one image, or one
video, and 32 text tokens; logits of the last position only, as generate's prefill):

- full: the unpatched model, N image (or video) tokens;
- desap: ``apply_desap(model, keep=K)``, all of DeSAP's work included;
- ideal: ``apply_desap(model, keep=K, ideal=True)``, each image's (or video's) first K tokens with
  no pruning work at all, the speed DeSAP could reach if pruning cost nothing. The vision tower
  runs plainly on every token (pruning after the encoder cannot save it; no attention capture,
  no text embedded), then only the kept tokens go through the projector: the first K of the image
  (the video models: of the clip, frame-major; the Qwen models: of the encoder's output, its patch
  merger included, at their original positions, and Qwen3-VL's DeepStack levels their first K).
  On LLaVA-NeXT K counts the image-newlines, as DeSAP's K does: every newline is kept, and the
  first K - newlines visual tokens of the packed order. It is the library's ideal, the one vLLM's
  ``"ideal": true`` keeps too (``integrations.common.pruning``).

Other pruning methods (``--methods``, ``desap_ops.methods``): ``apply_desap(model, keep=K,
method=m)`` at every budget beside these three, each one more variant of the same rounds; their
cost beyond the ideal (time and FLOPs) is what choosing and merging their tokens costs.

Timing: rounds after one warm-up round; in each round, for each K, full, desap, ideal and every
other method run one after another, so load from other processes hits them all alike; each time is the median over
the rounds (CUDA events on CUDA), and the ratios are ratios of those medians. The LLaVA-1.5 and
LLaVA-NeXT layouts also time the vision tower alone once per round.

FLOPs come from ``torch.utils.flop_counter`` (with a formula for SDPA's CPU kernel, which torch
leaves uncounted). For the LLaVA-1.5 and LLaVA-NeXT layouts they are counted over the pieces (vision
tower, projector, DeSAP's operator, language model) on a meta copy of the model, so ``--device
meta`` counts them at any size without memory. The Qwen and video models count them on the real
forward passes (the prompt surgery reads token ids); with ``--device meta`` those passes run on a
CPU under :class:`desap_ops.benchmarks.flops.ShapesOnly`, with parameters that hold no memory: every
counted op runs on meta and gives zeros, the rest for real, so the count is exact at any size (the
same as a real forward's; tests/benchmarks/test_bench_e2e.py compares them) and a few GiB suffice.
Real model shapes carry random weights: the timings hold for any weights; the outputs mean nothing.
Before building, the model's memory is estimated and compared with what the device has free, so a
model that cannot fit is refused instead of killed.

Every method, DeSAP included, is one :class:`~.e2e_result.MethodRow` of each budget's
:class:`~.e2e_result.E2eRow`, beside the full model's and the ideal's prefill.

This module is the bench's face for :mod:`desap_ops.benchmarks.skeleton` (check, plan, run, table,
figure); each job lives in a module of its own: the batch (:mod:`.e2e_batch`), the plan
(:mod:`.e2e_plan`), the variants (:mod:`.e2e_variants`), FLOP counting (:mod:`.flops`), the run
(:mod:`.e2e_run`), the result types (:mod:`.e2e_result`) and the table and figure (:mod:`.e2e_report`).
"""
from __future__ import annotations

from .e2e_batch import PIECEWISE, QWEN, TEXT_TOKENS, Batch, make_batch
from .e2e_plan import E2ePlan, check, default_keeps, make_plan, plan
from .e2e_report import describe, figure, table
from .e2e_result import E2eResult, E2eRow, MethodRow, Prefill, RoundTimes
from .e2e_run import WARMUP_ROUNDS, run
from .e2e_variants import Baseline, variant

__all__ = ["PIECEWISE", "QWEN", "TEXT_TOKENS", "Batch", "make_batch", "E2ePlan", "check", "default_keeps",
           "make_plan", "plan", "describe", "figure", "table", "E2eResult", "E2eRow", "MethodRow", "Prefill",
           "RoundTimes", "WARMUP_ROUNDS", "run", "Baseline", "variant"]
