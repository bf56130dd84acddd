"""The prompt text a patched model's task score reads, embedded: each image's (or video's) text
tokens by the rule of ``common.sequence.image_text_tokens`` (with a chat's markers,
``apply_desap(chat=...)``: only the user's words of the image's own turn), through the model's
own input embeddings."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...methods import Signal
from ..common.chat import user_turns
from ..common.sequence import image_text_tokens
from .state import DesapState


def text_embeddings(model: nn.Module, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                    token_id: int, lengths: Sequence[int], device,
                    written: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (I, L, C) and mask (I, L) of the prompt text of each of the items whose ``token_id``
    placeholders (``lengths`` of them, in order) ``input_ids`` hold; ``written`` (B, T) bool: tokens
    the processor wrote beside them, never text (``sequence.image_text_tokens``). All-masked
    (saliency alone decides) without ``input_ids``; empty (I, 0, C) for a method that reads no text
    (the ideal), which so embeds none."""
    options = model._desap.options
    if Signal.TEXT not in options.reads:
        weight = model.get_input_embeddings().weight
        return (torch.empty(len(lengths), 0, weight.shape[1], dtype=weight.dtype, device=device),
                torch.zeros(len(lengths), 0, dtype=torch.bool, device=device))
    if input_ids is None:
        ids = torch.zeros(len(lengths), 1, dtype=torch.long, device=device)
        mask = torch.zeros(len(lengths), 1, dtype=torch.bool, device=device)
    else:
        turns = None if options.chat is None else user_turns(input_ids, options.chat)
        ids, mask = image_text_tokens(input_ids, attention_mask, token_id, lengths, options.ignored_ids, turns,
                                      written)
    return model.get_input_embeddings()(ids.to(device)), mask.to(device)


def served_text_embeddings(model: nn.Module, count: int, token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`text_embeddings` of the ``count`` images (or videos) of the call being served, each
    found from its own run of placeholders: the served prompt holds each item's budget of them
    (``serving.shrink_runs`` records them; an image's budget may pass ``keep``, LLaVA-NeXT's newlines)."""
    state: DesapState = model._desap
    input_ids, attention_mask = state.call.prompt or (None, None)
    budgets = state.call.budgets.get(token_id)
    if input_ids is not None and (budgets is None or len(budgets) != count):
        raise RuntimeError(f"DeSAP served {count} items of token {token_id} with placeholder budgets {budgets} "
                           "recorded for the call: the prepare step must shrink the prompt before the encoder runs")
    return text_embeddings(model, input_ids, attention_mask, token_id, budgets or [0] * count, device)
