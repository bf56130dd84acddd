"""The registry of ``apply_desap``: {model class name: its :class:`~.family.Family`}, the checks before
patching, and the public entry points (``desap_ops.integrations`` re-exports them)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from ..common.chat import ChatMarkers, as_chat_markers
from ..common.prompt import config_ignored_ids
from ..common.pruning import DEFAULTS, PruneOptions
from ..common.record import PruneRecord
from . import compat, llava, llava_next, qwen2_5_vl, qwen3_vl, video
from .family import Family
from .serving import uninstall_methods
from .state import DesapState, Options

# model class name -> its family: how apply_desap patches it and what the patch needs (a subclass
# of a class here is patched as that class)
FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": llava.FAMILY,
    "LlavaNextForConditionalGeneration": llava_next.FAMILY,
    "Qwen2_5_VLForConditionalGeneration": qwen2_5_vl.FAMILY,
    "Qwen3VLForConditionalGeneration": qwen3_vl.QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl.QWEN3_VL_MOE,
    "Qwen3_5ForConditionalGeneration": qwen3_vl.QWEN3_5,
    "Qwen3_5MoeForConditionalGeneration": qwen3_vl.QWEN3_5_MOE,
    "LlavaNextVideoForConditionalGeneration": replace(video.LLAVA_NEXT_VIDEO, image_tokens=llava_next.image_tokens),
    "VideoLlavaForConditionalGeneration": video.VIDEO_LLAVA,
}
SUPPORTED = tuple(FAMILIES)


def _family(model, caller: str, serves: Callable[[Family], bool] = lambda family: True) -> Family:
    """The family of ``model``'s class, or of the nearest class it derives from, among those ``serves`` accepts."""
    served = [name for name, family in FAMILIES.items() if serves(family)]
    for cls in type(model).__mro__:
        if cls.__name__ in served:
            return FAMILIES[cls.__name__]
    raise TypeError(f"{caller} supports {', '.join(served)}; got {type(model).__name__}")


def apply_desap(model: nn.Module, keep: int = DEFAULTS.keep,
                task_ratio: Union[float, Literal["auto"]] = DEFAULTS.task_ratio,
                merge: Optional[bool] = DEFAULTS.merge, *, text_reduce: str = DEFAULTS.text_reduce,
                exclude_token_ids=DEFAULTS.exclude_token_ids,
                backend: str = DEFAULTS.backend, text_budget: Optional[int] = DEFAULTS.text_budget,
                chat: Union[ChatMarkers, Any, None] = None, ideal: bool = DEFAULTS.ideal,
                method: str = DEFAULTS.method) -> nn.Module:
    """Patch ``model`` in place so every image reaches the language model as at most ``keep`` tokens.

    Args:
        model: one of ``SUPPORTED`` (or a subclass): LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL
            and Qwen3.5 (dense and MoE), LLaVA-NeXT-Video, Video-LLaVA.
        keep: at most this many tokens per image (LLaVA-NeXT: per image over its base and crops
            together; the Qwen models: language-model tokens, each a merged 2 x 2 group of
            patches) or per video across all its frames (the video models and the Qwen models).
        task_ratio, text_reduce, backend, text_budget: as in :func:`desap_ops.prune`
            (``task_ratio="auto"``: each image's split read from its own task scores;
            ``text_budget=M``: at most M text tokens per image take part).
        merge: whether the dropped tokens merge into the kept ones, as in :func:`desap_ops.prune`;
            None (the default): as the method does by its paper (``Method.merges``: DeSAP merges,
            the baselines drop).
        exclude_token_ids: token ids that never count as prompt text; padding, BOS, EOS and image
            tokens never count.
        chat: the chat template's markers, a :class:`ChatMarkers` or a tokenizer or processor to
            read them from: then only the user's words of the image's own turn count as text (no
            role words, turn ends, answers or later turns; docs/integrations.md). None: every
            token after the image does. A tokenizer or processor also spells the Qwen3
            generation's frame timestamps, which then never count as text however many frames.
        ideal: keep each image's (or video's) first ``keep`` tokens instead, unscored and unmerged,
            in the same places (LLaVA-NeXT: its first visual tokens in packed order, every newline
            kept): the speed pruning could reach if it cost nothing, as vLLM's ``"ideal": true``
            (the method ``"first"`` unmerged; ``method`` must then be left as it is, or ``"first"``).
        method: the pruning method that chooses the kept tokens: ``"desap"`` (the contract), a
            baseline (``"first"``, ``"random"``, ``"saliency"``, ``"similarity"``, ``"divprune"``) or
            one registered with :func:`desap_ops.register_method` (docs/methods.md). The budget, the
            placeholders, positions and the merge (when on) are the same for every method.
    The defaults are both engines' (``integrations.common.pruning.DEFAULTS``) but for ``chat``.
    Returns the model. Applying again replaces the previous patch.

    Raises:
        TypeError: an unsupported model (the model is left as it was), or an option of the wrong type.
        RuntimeError: a transformers release older than the oldest tested one, or one that lacks a
            model internal the patch uses (``compat``); the model is left as it was. A release
            newer than the newest tested one gives a warning.
        ValueError: an option out of range; a supported model is left without DeSAP. (A ``keep``
            above an image's tokens is no error: that image passes whole.)
    """
    family = _family(model, "apply_desap")
    compat.check_version()
    compat.check_hooks(model, family.hooks)
    remove_desap(model)
    ignored = config_ignored_ids(model.config, getattr(model, "generation_config", None), exclude_token_ids)
    prune = PruneOptions.checked(keep, task_ratio, merge, text_reduce, backend, text_budget, method, ideal=ideal)
    markers = as_chat_markers(chat)
    tokenizer = None if chat is None or isinstance(chat, ChatMarkers) else chat
    family.install(model, DesapState(Options(**vars(prune), ignored_ids=frozenset(ignored), chat=markers,
                                             tokenizer=tokenizer)))
    return model


def remove_desap(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_desap`: the model's own methods again, and nothing of DeSAP left on it."""
    if getattr(model, "_desap", None) is not None:
        uninstall_methods(model)
    return model


def last_prune(model: nn.Module) -> Optional[tuple[PruneRecord, ...]]:
    """The records of the last vision pass ``model`` ran under :func:`apply_desap`: one per image
    (or video), in the order the model received them (images first, then videos); None before any."""
    state: Optional[DesapState] = getattr(model, "_desap", None)
    if state is None or state.records.last is None:
        return None
    return tuple(state.records.last)


def image_token_counts(model: nn.Module, pixel_values: torch.Tensor, image_sizes=None) -> list[int]:
    """How many placeholder tokens the processor gives each image (before pruning): LLaVA-1.5,
    LLaVA-NeXT and LLaVA-NeXT-Video; ``image_sizes`` as the processor returns it (LLaVA-NeXT)."""
    family = _family(model, "image_token_counts", lambda family: family.image_tokens is not None)
    return family.image_tokens(model, pixel_values, image_sizes)
