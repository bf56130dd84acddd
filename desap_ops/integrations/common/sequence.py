"""Sequence surgery: shrink each image's placeholder run to ``keep`` tokens, and find each image's
text tokens.

Images fill the placeholder tokens in row-major order (as ``masked_scatter`` does in transformers),
so the g-th placeholder of the flattened batch belongs to the image whose cumulative token count
first exceeds g. That gives every placeholder its image and its index inside the image without a
Python loop over tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch


def placeholder_owners(input_ids: torch.Tensor, image_token_id: int, lengths: Sequence[int]):
    """(image id, index within the image) of every position; -1 where not a placeholder."""
    is_image = input_ids == image_token_id
    flat = is_image.reshape(-1)
    order = torch.cumsum(flat.long(), dim=0) - 1                       # global placeholder number
    ends = torch.cumsum(torch.as_tensor(list(lengths), device=input_ids.device), dim=0)
    owner = torch.searchsorted(ends, order.clamp_min(0), right=True)
    starts = ends - torch.as_tensor(list(lengths), device=input_ids.device)
    within = order - starts[owner.clamp_max(len(lengths) - 1)]
    owner = torch.where(flat, owner, -1).view_as(input_ids)
    within = torch.where(flat, within, -1).view_as(input_ids)
    return owner, within


def count_placeholders(input_ids: torch.Tensor, image_token_id: int) -> int:
    return int((input_ids == image_token_id).sum())


def image_budget(keep: int, tokens: int, structural: int = 0) -> int:
    """How many tokens an image of ``tokens`` sends under ``keep``, which means "at most": an
    image with no more tokens than ``keep`` passes whole; a layout whose ``structural`` tokens
    (LLaVA-NeXT's image newlines) leave no room keeps them and one visual token. vLLM's
    processors and ``apply_desap`` count placeholders with this one rule."""
    return min(tokens, max(keep, structural + 1))


def first_placeholders(lengths: Sequence[int], keep: Union[int, Sequence[int]], device=None) -> torch.Tensor:
    """Keep flags for the placeholders of all images in order: the first ``keep`` of each (one
    number for every image, or one per image)."""
    keeps = [keep] * len(lengths) if isinstance(keep, int) else list(keep)
    return torch.cat([torch.arange(n, device=device) < k for n, k in zip(lengths, keeps)])


class Shortened(NamedTuple):
    """A batch's prompt tensors with tokens dropped and the rows padded again (None where none was given)."""

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]   # (B, T') or (3, B, T')
    token_types: Optional[torch.Tensor]


def shrink_placeholders(
    kept_placeholders: torch.Tensor,
    image_token_id: int,
    pad_token_id: int,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    token_types: Optional[torch.Tensor] = None,
    pad_left: bool = False,
) -> Shortened:
    """Drop the placeholders whose flag in ``kept_placeholders`` (one per placeholder of the batch,
    in row-major order) is False, and every padding position.

    The rows are padded again to the longest, on the side the batch was padded on (``pad_left``
    when it was not padded), with pad tokens, mask 0 and label -100. ``position_ids`` may be (B, T)
    or (3, B, T) (multimodal rotary positions); kept tokens keep their positions. Returns them as
    :class:`Shortened` (None where None was given).
    """
    is_image = input_ids == image_token_id
    kept = torch.ones_like(is_image)
    kept[is_image] = kept_placeholders.to(kept.device)
    return drop_tokens(kept, pad_token_id, input_ids, attention_mask, labels, position_ids, token_types, pad_left)


def drop_tokens(
    kept: torch.Tensor,
    pad_token_id: int,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    token_types: Optional[torch.Tensor] = None,
    pad_left: bool = False,
) -> Shortened:
    """:func:`shrink_placeholders` with the positions to keep given as a (B, T) bool mask (any
    token, of any kind of placeholder); padding positions are dropped too."""
    kept = kept.clone()
    if attention_mask is not None:
        if bool((attention_mask == 0).any()):
            pad_left = bool((attention_mask[:, 0] == 0).any())
        kept &= attention_mask.bool()
    rows = input_ids.shape[0]
    new_len = int(kept.sum(dim=1).max())
    if attention_mask is None and bool((kept.sum(dim=1) != new_len).any()):
        attention_mask = torch.ones_like(input_ids)   # rows now differ in length: mask the padding

    def gather(tensor, fill):
        if tensor is None:
            return None
        out = torch.full((rows, new_len) + tuple(tensor.shape[2:]), fill, dtype=tensor.dtype, device=tensor.device)
        for r in range(rows):
            values = tensor[r][kept[r]]
            if pad_left:
                out[r, new_len - values.shape[0]:] = values
            else:
                out[r, :values.shape[0]] = values
        return out

    if position_ids is not None and position_ids.dim() == 3:
        position_ids = torch.stack([gather(p, 0) for p in position_ids])
    else:
        position_ids = gather(position_ids, 0)
    return Shortened(gather(input_ids, pad_token_id), gather(attention_mask, 0), gather(labels, -100), position_ids,
                     gather(token_types, 0))


def image_text_tokens(
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    image_token_id: int,
    lengths: Sequence[int],
    ignored_ids: set[int],
    turns: Optional[torch.Tensor] = None,
    written: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the text tokens its task score reads (docs/algorithm.md, "The text an image
    reads"), never padding, placeholders (of any image) or ``ignored_ids``:

    - with ``turns`` (B, T) int64, a chat's user words numbered by turn (``chat.user_turns``), for an
      image inside a user turn: every word of that turn, before and after the image. The system
      prompt, role words, answers and other turns never count, so what an image keeps does not
      change as the conversation goes on; an image inside an answer reads nothing.
    - without ``turns``, or where no user turn opened before the image (a raw prompt): the text
      after the image to the end of its row (markers left out); where nothing follows it, the
      text before it (a question asked before the image).

    What the processor wrote beside the items, ``written`` (B, T) bool (Qwen3-VL's frame timestamps:
    ``hf.qwen3_vl.video_frame_text``), is never the user's words: vLLM reads the prompt before its
    processor writes them, so both engines read the same text. ``lengths`` are the items'
    placeholder counts in this prompt, each item's own.

    Returns (ids (I, L), mask (I, L)) with L >= 1; an image with no such token has an all-False row.
    """
    owner, _ = placeholder_owners(input_ids, image_token_id, lengths)
    valid = owner < 0
    if attention_mask is not None:
        valid &= attention_mask.bool()
    if written is not None:
        valid &= ~written.to(valid.device)
    for token in ignored_ids:
        valid &= input_ids != token
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    per_image = []
    for image in range(len(lengths)):
        hits = (owner == image).nonzero()
        if hits.numel() == 0:
            per_image.append(input_ids.new_empty(0))
            continue
        row, first, last = int(hits[0, 0]), int(hits[:, 1].min()), int(hits[:, 1].max())
        own = 0 if turns is None else int(turns[row, last])
        if own != 0:   # inside a user turn: its words (-1, inside an answer: none)
            text = valid[row] & (turns[row] == own) & (own > 0)
        else:          # no user turn opened before the image (or no markers): after it, else before it
            words = valid[row] if turns is None else valid[row] & (turns[row] >= 0)
            text = words & (positions > last)
            if not bool(text.any()):
                text = words & (positions < first)
        per_image.append(input_ids[row][text])
    width = max(1, max(t.numel() for t in per_image))
    ids = input_ids.new_zeros((len(lengths), width))
    mask = torch.zeros((len(lengths), width), dtype=torch.bool, device=input_ids.device)
    for i, tokens in enumerate(per_image):
        ids[i, :tokens.numel()] = tokens
        mask[i, :tokens.numel()] = True
    return ids, mask
