"""What DeSAP changes in a vLLM model class (a mixin over the model's own class): its
``embed_multimodal`` prunes each image to at most ``keep`` tokens (``sequence.image_budget``: an
image with no more passes whole) with ``desap_ops.prune`` (the reference on CPU, the Triton
kernels on CUDA), each with its own request's options (the per-item field ``desap_options``:
:meth:`DesapModelMixin.desap_item_options`). Under the engine option ``ideal`` an image keeps its
first ``keep`` tokens instead (``common.pruning``, as ``apply_desap(ideal=True)``), from a plain
tower pass: no attention hooks, no text embedded. Without
``desap`` in the config every method is the model's own.

The scheduler charges a pruned image its placeholders, not the tokens the vision tower runs on,
so one ``embed_multimodal`` call may bring more images than vLLM's encoder budget was planned
for. The tower therefore runs in micro-batches (:func:`encoder_batches`) of at most
``max_num_encoder_input_tokens`` full-size tokens, the budget vLLM plans without DeSAP."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import Optional, Sequence

import torch

from ...methods import MethodFailure, Signal, TokenGrid
from ...reference import PruneResult
from ..common.pruning import FALLBACK_METHOD, prune_images, tower_reads
from ..common.record import PruneRecord, records_of, warn_if_text_blind
from ..common.signals import TowerSignals
from . import building_parts
from .options import DesapOptions, decode_request, read_options
from .processor import OPTIONS_KEYS, TEXT_KEY
from .tower import read_vllm_tower

log = logging.getLogger(__name__)
HISTORY = 256   # images whose prune record a model keeps (``desap_history``), for inspection and tests


def encoder_batches(tokens: Sequence[int], budget: int) -> list[range]:
    """Consecutive runs of images, in order, whose full-size token counts (``tokens``: what vLLM
    charges each image without DeSAP) add up to at most ``budget``; an image over it runs alone."""
    batches, start, total = [], 0, 0
    for i, n in enumerate(tokens):
        if i > start and total + n > budget:
            batches.append(range(start, i))
            start, total = i, 0
        total += n
    if start < len(tokens):
        batches.append(range(start, len(tokens)))
    return batches


def equal_runs(values: Sequence) -> list[range]:
    """Consecutive runs of equal ``values``, in order (images of one request share its options)."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append(range(start, i))
            start = i
    return runs


def registered_with(processor_class, architecture: str):
    """Class decorator: a DeSAP model class gets ``processor_class`` as its multimodal processor,
    with the processing info and dummy inputs of the class vLLM's registry resolves for
    ``architecture``. A release that gave the architecture another processor is refused, never run
    with the old one (``hooks.processor_problem``)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from .hooks import SUPPORTED_VLLM, VllmVersionError, registered_class, registered_processor_problem

    factories = registered_class(architecture)._processor_factory
    problem = registered_processor_problem(architecture, factories.processor)
    if problem:
        raise VllmVersionError(f"DeSAP's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}: {problem}")
    return MULTIMODAL_REGISTRY.register_processor(lambda info, dummy_inputs: processor_class(info, dummy_inputs),
                                                  info=factories.info, dummy_inputs=factories.dummy_inputs)


class DesapModelMixin:
    desap: Optional[DesapOptions]
    told_text_blind = False   # the text-blind warning (common.record.TEXT_BLIND) was logged in this process

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        with building_parts():
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.desap = read_options(vllm_config.model_config.hf_config)
        # full-size tokens the vision tower may see in one call: vLLM's encoder budget without DeSAP
        self.desap_encoder_budget = int(vllm_config.scheduler_config.max_num_encoder_input_tokens)
        # one record per pruned image (or video), newest last
        self.desap_history: deque[PruneRecord] = deque(maxlen=HISTORY)

    def embed_multimodal(self, **kwargs):
        text_ids, encoded = kwargs.pop(TEXT_KEY, None), kwargs.pop(OPTIONS_KEYS["image"], None)
        if self.desap is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError(f"DeSAP prunes from pixels; this request gave {image_input['type']}")
        options = self.desap_item_options(encoded, len(text_ids) if text_ids is not None else 0)
        texts, text_mask = self.desap_texts(text_ids, tower_reads(options))
        features = []
        for batch in encoder_batches(self.desap_image_tokens(image_input), self.desap_encoder_budget):
            features += self.desap_features(image_input, batch, texts[batch.start:batch.stop],
                                            text_mask[batch.start:batch.stop], options[batch.start:batch.stop])
        return features

    def desap_image_tokens(self, image_input) -> list[int]:
        """Each image's full token count, as vLLM would charge it without DeSAP."""
        raise NotImplementedError

    def desap_features(self, image_input, batch: range, texts, text_mask,
                       options: list[DesapOptions]) -> list[torch.Tensor]:
        """The pruned features of the images in ``batch`` (one tower call), with their texts and
        their requests' options."""
        raise NotImplementedError

    def desap_item_options(self, encoded, items: int) -> list[DesapOptions]:
        """Each item's options from its field ``desap_options`` (``encoded``: (I, 6) or I tensors
        of ``options.encode_request``); the engine's for all ``items`` where the field is absent."""
        if encoded is None:
            return [self.desap] * items
        return [decode_request(self.desap, row) for row in encoded]

    def desap_texts(self, text_ids, reads: frozenset) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (I, L, C) and mask (I, L) of each image's prompt text (``desap_text_ids``: a
        (I, L) tensor or I 1-D tensors); empty (I, 0, C) where no method of the call ``reads`` text
        (the ideal), which so embeds none."""
        rows = list(text_ids) if text_ids is not None else []
        parameter = next(self.get_language_model().parameters())
        device = parameter.device
        if Signal.TEXT not in reads:
            width = self.config.get_text_config().hidden_size
            return (torch.empty(len(rows), 0, width, dtype=parameter.dtype, device=device),
                    torch.zeros(len(rows), 0, dtype=torch.bool, device=device))
        width = max([1] + [int(r.numel()) for r in rows])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :row.numel()] = row.reshape(-1).long().cpu()
            mask[i, :row.numel()] = True
        embedded = self.get_language_model().embed_input_ids(ids.to(device).reshape(-1))
        return embedded.reshape(len(rows), width, -1), mask.to(device)

    def desap_signals(self, pixel_values: torch.Tensor, drop_cls: bool, reads: frozenset) -> TowerSignals:
        return read_vllm_tower(self.vision_tower, pixel_values, drop_cls, reads)

    def desap_text_space(self, branch: torch.Tensor) -> torch.Tensor:
        """The attention branch mapped to the language model's space: LLaVA's projector."""
        return self.multi_modal_projector(branch)

    def desap_prune(self, signals: TowerSignals, texts: torch.Tensor, text_mask: torch.Tensor,
                    keep: int, options: DesapOptions, grid: Optional[TokenGrid] = None) -> PruneResult:
        """``desap_ops.prune`` on one batch of images that share ``options`` (their request's);
        recorded (``desap_history``). ``keep`` is the images' budget (``sequence.image_budget``); at
        their token count every token is kept, in order. The images' method chooses
        (``common.pruning``); a method that fails (``MethodFailure``: it raised, or gave back a wrong
        selection) is logged with its name and the images keep their first ``keep`` tokens (the
        method ``FALLBACK_METHOD``), merged or not as the failed method would have been (the
        request's ``merge``, else that method's default: ``options.merges``): an exception here
        would take the engine down with every request in it. ``grid``: where the tokens lie (None: one square)."""
        method = options.method
        try:
            result = prune_images(signals, self.desap_text_space, texts, text_mask, keep, options, grid)
        except MethodFailure as failure:
            method = FALLBACK_METHOD
            log.error("DeSAP: MethodFailure: %s; these %d image(s) keep their first %d tokens instead", failure,
                      signals.hidden.shape[0], keep)
            result = prune_images(signals, self.desap_text_space, texts, text_mask, keep,
                                  replace(options, method=method, merge=options.merges), grid)
        records = records_of(result, signals.saliency, text_mask.sum(dim=1), method)
        self.desap_history.extend(records)
        # once per engine process
        DesapModelMixin.told_text_blind = warn_if_text_blind(records, options.reads, DesapModelMixin.told_text_blind)
        return result
