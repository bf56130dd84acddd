"""The prompt text DeSAP's task score reads: which tokens count, and their embeddings.

Each image (or video) reads the text tokens after its placeholders to the end of its row
(``sequence.image_text_tokens``), without the ids of :func:`ignored_token_ids`; with a chat's
markers (``apply_desap(chat=...)``), only the user's words of the image's own turn (``chat.user_turns``).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .chat import user_turns
from .sequence import image_text_tokens
from .state import DesapState

STRUCTURAL_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# logged once per model (transformers) or per engine (vLLM) when an image read no text
TEXT_BLIND = ("DeSAP: an image had no prompt text for its task score to read, so saliency alone chose its "
              "tokens (text-blind pruning, not DeSAP's task score). Each record says how many text tokens an "
              "image read (text_tokens; 0 here); docs/algorithm.md, \"The text an image reads\", says which count")


def ignored_token_ids(model: nn.Module, extra: Iterable[int] = ()) -> set[int]:
    """Token ids that never count as prompt text: image/video placeholders, the markers around
    them, padding, BOS, EOS, and the caller's ``extra``."""
    return config_ignored_ids(model.config, getattr(model, "generation_config", None), extra)


def config_ignored_ids(config, generation_config=None, extra: Iterable[int] = ()) -> set[int]:
    """:func:`ignored_token_ids` read from a model's config and generation config (an object or a
    dict), for engines that hold no transformers model (vLLM)."""
    ids = {getattr(config, name) for name in STRUCTURAL_TOKENS if isinstance(getattr(config, name, None), int)}
    for source in (config.text_config, generation_config):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(source, dict):
                value = source.get(name)
            else:
                value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
    return ids | {int(t) for t in extra}


def text_embeddings(model: nn.Module, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                    token_id: int, lengths: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (I, L, C) and mask (I, L) of the prompt text of each of the runs of ``token_id``
    placeholders (``lengths`` long, in order) in ``input_ids``; all-masked (saliency alone decides)
    without ``input_ids``."""
    state: DesapState = model._desap
    if input_ids is None:
        ids = torch.zeros(len(lengths), 1, dtype=torch.long, device=device)
        mask = torch.zeros(len(lengths), 1, dtype=torch.bool, device=device)
    else:
        turns = None if state.chat is None else user_turns(input_ids, state.chat)
        ids, mask = image_text_tokens(input_ids, attention_mask, token_id, lengths, state.ignored_ids, turns)
    return model.get_input_embeddings()(ids.to(device)), mask.to(device)


def served_text_embeddings(model: nn.Module, count: int, token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`text_embeddings` of the ``count`` images (or videos) of the call being served, whose
    prompt already holds ``keep`` placeholders for each."""
    state: DesapState = model._desap
    input_ids, attention_mask = state.prompt or (None, None)
    return text_embeddings(model, input_ids, attention_mask, token_id, [state.keep] * count, device)
