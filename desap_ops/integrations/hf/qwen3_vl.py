"""DeSAP inside transformers' Qwen3-VL and Qwen3.5, dense and MoE
(``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``).

The four share one vision tower: no [CLS], full attention in every block (within an image, or
within one frame of a video), a 2 x 2 patch merger. Qwen3.5 is that tower without DeepStack, so
one patcher serves both generations:

- saliency: the attention each language-model token receives at the tower's **last** block (summed
  over its 2 x 2 patches), from that block's own queries and keys with rotary applied;
- attention branch: the last block's attention output through the model's own merger;
- hidden and metric: the merged tokens the language model receives;
- DeepStack (Qwen3-VL): the features of the earlier tower layers that the first language-model
  layers add at the visual positions are pruned with the same indices and merged with the same
  assignment as the main tokens, so every level stays aligned with the kept tokens.

Planning, positions (the timestamps between a video's frames are text and keep theirs) and
generation are shared with Qwen2.5-VL (``qwen``, the Qwen base patcher). The timestamps are the
processor's text, never the user's words (:func:`frame_timestamps`): vLLM reads a video's text from
the prompt before its processor writes them, and so does ``apply_desap``.
"""
from __future__ import annotations

import inspect
import sys

from typing import AbstractSet, Any, NamedTuple, Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...methods import SIGNALS
from ..common.hooked import Hook
from ..common.sequence import placeholder_owners
from ..common.signals import TowerSignals
from . import qwen
from .family import Family
from .state import DesapState


def _hooks(module: str, deepstack: bool) -> tuple[Hook, ...]:
    """The internals the patch uses in the modeling module ``module`` (``transformers.models.<name>``)."""
    modeling = f"transformers.models.{module}.modeling_{module}"
    return (
        *qwen.PLAN_HOOKS,
        Hook("model.model.get_rope_index", ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                                            "attention_mask")),
        Hook(f"{modeling}.apply_rotary_pos_emb_vision"),
        *((Hook("model.model.visual.deepstack_merger_list"),
           Hook(f"{modeling}.BaseModelOutputWithDeepstackFeatures")) if deepstack else ()),
    )


HOOKS_QWEN3_VL = _hooks("qwen3_vl", deepstack=True)
HOOKS_QWEN3_VL_MOE = _hooks("qwen3_vl_moe", deepstack=True)
HOOKS_QWEN3_5 = _hooks("qwen3_5", deepstack=False)
HOOKS_QWEN3_5_MOE = _hooks("qwen3_5_moe", deepstack=False)


def _modeling(model: nn.Module):
    """The modeling module of ``model``'s vision tower (its own rotary and output classes)."""
    return sys.modules[type(model.model.visual).__module__]


def has_deepstack(model: nn.Module) -> bool:
    return len(getattr(model.model.visual, "deepstack_merger_list", ())) > 0


def read_tower(model: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
               reads: AbstractSet[str] = SIGNALS) -> TowerSignals:
    """One tower pass over images or videos, read at the last block (whose order is the model's);
    DeepStack levels included. Only the signals the method ``reads`` (without saliency and branch:
    the hidden states and levels alone, from a plain pass with no capture), and the pixel hashes
    where it reads the seed."""
    visual = model.model.visual
    return qwen.read_qwen_tower(visual, pixels, grid_thw, reads, len(visual.blocks) - 1,
                                lambda: _modeling(model).apply_rotary_pos_emb_vision)


def deepstack_per_image(model: nn.Module) -> bool:
    """Whether the model reads DeepStack levels split per image (transformers >= 5.18, the release
    that also brought ``mm_encoder_outputs`` to the forward) or as one tensor per level (before)."""
    return "mm_encoder_outputs" in inspect.signature(type(model.model).forward).parameters


# how transformers' Qwen3VLProcessor.replace_video_token writes each frame group's time (seconds)
TIMESTAMP_FORMAT = "<{:.1f} seconds>"
# times whose spellings differ in their first and their last digit and together hold every digit,
# and times of other widths that the learned shape must spell back
_LEARN_SECONDS, _CHECK_SECONDS = (0.1, 23.4, 567.8, 9.0), (0.5, 10.5, 100.0, 1234.5)


class TimestampShape(NamedTuple):
    """A tokenizer's spelling of the processor's frame timestamps: ``prefix``, the seconds as any
    number of ``digits`` tokens, ``suffix`` (ids)."""

    prefix: tuple[int, ...]
    digits: frozenset[int]
    suffix: tuple[int, ...]


def timestamp_shape(tokenizer: Any) -> Optional[TimestampShape]:
    """How ``tokenizer`` (or a processor holding one) spells :data:`TIMESTAMP_FORMAT`, learned from
    sample times: the ids every sample begins and ends with, and the ids between. None where the
    shape does not spell other times back (a tokenizer that merges digits into longer tokens)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def spell(seconds: float) -> list:
        return list(tokenizer.encode(TIMESTAMP_FORMAT.format(seconds), add_special_tokens=False))
    samples = [spell(t) for t in _LEARN_SECONDS]
    shortest = min(len(ids) for ids in samples)
    end = next((n for n in range(shortest) if len({tuple(ids[len(ids) - n - 1:]) for ids in samples}) > 1), shortest)
    middles = [ids[:len(ids) - end] for ids in samples]
    start = next((n for n in range(min(map(len, middles))) if len({ids[n] for ids in middles}) > 1),
                 min(map(len, middles)))
    shape = TimestampShape(tuple(samples[0][:start]), frozenset(i for ids in middles for i in ids[start:]),
                           tuple(samples[0][len(samples[0]) - end:]))
    for seconds in _CHECK_SECONDS:
        ids = spell(seconds)
        if timestamp_before(ids, shape) != len(ids):
            return None
    return shape


def timestamp_before(text: Sequence[int], shape: TimestampShape) -> int:
    """How many of the last tokens of ``text`` (the ids before a frame's vision marker) are the
    processor's timestamp spelled as ``shape``; 0 where it does not end in one. A prefix the
    tokenizer merged with the user's characters before it (a byte-level BPE's ``" <"``) holds
    their words: it stays text, as it does in vLLM's prompt, where those characters stand alone."""
    text = [int(i) for i in text]
    at = len(text) - len(shape.suffix)
    if at < 0 or tuple(text[at:]) != shape.suffix:
        return 0
    digits = at
    while digits > 0 and text[digits - 1] in shape.digits:
        digits -= 1
    if shape.digits and digits == at:
        return 0   # a suffix without the seconds before it: the user's words
    if shape.prefix and tuple(text[max(digits - len(shape.prefix), 0):digits]) == shape.prefix:
        digits -= len(shape.prefix)
    return len(text) - digits


def video_frame_text(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], token_id: int,
                       lengths: Sequence[int], start_id: int, end_id: int,
                       shape: Optional[TimestampShape] = None) -> torch.Tensor:
    """(B, T) bool: the text the processor wrote for each video: its frames' timestamps and markers.

    The processor writes each frame group as ``<t seconds>`` ``<|vision_start|>`` its tokens
    ``<|vision_end|>``. Everything between a video's first and last placeholder is the processor's;
    the first timestamp stands before the first frame:

    - where the prompt's own ``<|vision_start|>`` still wraps the video (transformers before it
      collapsed that wrapper), it is everything between that marker and the first frame's;
    - else, given the tokenizer's ``shape`` (:func:`timestamp_shape`), it is the tokens before the
      frame that spell a timestamp (:func:`timestamp_before`), for any number of frame groups;
    - else it is as long as the second frame's timestamp, or shorter where it has fewer digits:
      the longest such tail of the text before the frame that begins with the second
      timestamp's first token (``<``), else exactly as long. A one-group clip (2 frames) leaves
      nothing to learn the timestamp's tokens from: it stays text there (docs/integrations.md)."""
    written = torch.zeros_like(input_ids, dtype=torch.bool)
    owner, _ = placeholder_owners(input_ids, token_id, lengths)
    valid = torch.ones_like(written) if attention_mask is None else attention_mask.bool()
    stops = (input_ids == start_id) | (input_ids == end_id) | (owner >= 0) | ~valid
    for item in range(len(lengths)):
        hits = (owner == item).nonzero()
        if hits.numel() == 0:
            continue
        row, columns = int(hits[0, 0]), hits[:, 1]
        first, last = int(columns.min()), int(columns.max())
        if (first == 0 or last + 1 == input_ids.shape[1] or int(input_ids[row, first - 1]) != start_id
                or int(input_ids[row, last + 1]) != end_id):
            continue   # not the processor's frame layout
        frame = first - 1
        written[row, frame:last + 2] = owner[row, frame:last + 2] != item   # the frames' markers and later timestamps
        stop = frame - 1   # the nearest marker, placeholder or padding before the first frame's marker
        while stop >= 0 and not bool(stops[row, stop]):
            stop -= 1
        if stop >= 0 and int(input_ids[row, stop]) == start_id and not bool(owner[row, stop] >= 0):
            written[row, stop + 1:frame] = True   # the prompt's own wrapper: the timestamp lies inside it
            continue
        if shape is not None:
            written[row, frame - timestamp_before(input_ids[row, stop + 1:frame].tolist(), shape):frame] = True
            continue
        breaks = (columns[1:] - columns[:-1] > 1).nonzero()
        if breaks.numel() == 0:
            continue   # one frame group: no second timestamp to learn from
        end, start = int(columns[int(breaks[0, 0])]), int(columns[int(breaks[0, 0]) + 1])
        second = input_ids[row, end + 2:start - 1]   # between the first group's end marker and the second's start
        room = frame - stop - 1
        size = min(second.numel(), room)
        length = next((n for n in range(size, 0, -1) if int(input_ids[row, frame - n]) == int(second[0])), size)
        written[row, frame - length:frame] = True
    return written


def frame_timestamps(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     lengths: list, shape: Optional[TimestampShape] = None) -> torch.Tensor:
    """``qwen.VideoText`` of Qwen3-VL and Qwen3.5: each video's frame timestamps and markers
    (:func:`video_frame_text`; ``shape``: the tokenizer's spelling of a timestamp, where known)."""
    config = model.config
    return video_frame_text(input_ids, attention_mask, config.video_token_id, lengths,
                              config.vision_start_token_id, config.vision_end_token_id, shape)


def install(model: nn.Module, state: DesapState) -> None:
    """Patch a Qwen3-VL or Qwen3.5 model (dense or MoE): forward, generate, generate's positions,
    the image and video features."""
    if not has_deepstack(model):
        output = lambda features, levels: BaseModelOutputWithPooling(pooler_output=features)  # noqa: E731
    else:
        with_deepstack, per_image = _modeling(model).BaseModelOutputWithDeepstackFeatures, deepstack_per_image(model)

        def output(features: list, levels: list):
            stacked = levels if per_image else [torch.cat(level) for level in levels]
            return with_deepstack(pooler_output=features, deepstack_features=stacked)
    # the tokenizer apply_desap was given spells the frames' timestamps; learned once, here
    shape = None if state.options.tokenizer is None else timestamp_shape(state.options.tokenizer)
    qwen.install(model, state, read_tower, output,
                 lambda m, input_ids, mask, lengths: frame_timestamps(m, input_ids, mask, lengths, shape))


# one patcher, four classes: each checks the internals of its own modeling module
QWEN3_VL = Family(install, HOOKS_QWEN3_VL)
QWEN3_VL_MOE = Family(install, HOOKS_QWEN3_VL_MOE)
QWEN3_5 = Family(install, HOOKS_QWEN3_5)
QWEN3_5_MOE = Family(install, HOOKS_QWEN3_5_MOE)
