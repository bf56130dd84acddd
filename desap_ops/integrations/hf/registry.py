"""The registry of ``apply_desap``: {model class name: the family's patcher}, the checks before
patching, and the public entry points (``desap_ops.integrations`` re-exports them)."""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from ..common.chat import ChatMarkers, as_chat_markers
from ..common.prompt import config_ignored_ids
from ..common.pruning import DEFAULTS, PruneOptions
from ..common.record import PruneRecord
from . import compat, llava, llava_next, qwen2_5_vl, qwen3_vl, video
from .serving import uninstall_methods
from .state import DesapState, Options

# model class name -> install(model, state): patches the model in place
PATCHERS: dict[str, Callable[[nn.Module, DesapState], None]] = {
    "LlavaForConditionalGeneration": llava.install,
    "LlavaNextForConditionalGeneration": llava_next.install,
    "Qwen2_5_VLForConditionalGeneration": qwen2_5_vl.install,
    "Qwen3VLForConditionalGeneration": qwen3_vl.install,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl.install,
    "Qwen3_5ForConditionalGeneration": qwen3_vl.install,
    "Qwen3_5MoeForConditionalGeneration": qwen3_vl.install,
    "LlavaNextVideoForConditionalGeneration": video.install_llava_next_video,
    "VideoLlavaForConditionalGeneration": video.install_video_llava,
}
SUPPORTED = tuple(PATCHERS)

# model class name -> the model internals its patch uses (checked before patching: compat)
HOOKS: dict[str, tuple[compat.Hook, ...]] = {
    "LlavaForConditionalGeneration": llava.HOOKS,
    "LlavaNextForConditionalGeneration": llava_next.HOOKS,
    "Qwen2_5_VLForConditionalGeneration": qwen2_5_vl.HOOKS,
    "Qwen3VLForConditionalGeneration": qwen3_vl.HOOKS_QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": qwen3_vl.HOOKS_QWEN3_VL_MOE,
    "Qwen3_5ForConditionalGeneration": qwen3_vl.HOOKS_QWEN3_5,
    "Qwen3_5MoeForConditionalGeneration": qwen3_vl.HOOKS_QWEN3_5_MOE,
    "LlavaNextVideoForConditionalGeneration": video.HOOKS,
    "VideoLlavaForConditionalGeneration": video.HOOKS,
}

# model class name -> the processor's placeholder count of each image, for the LLaVA image paths
IMAGE_TOKEN_COUNTS: dict[str, Callable[..., list[int]]] = {
    "LlavaForConditionalGeneration": llava.image_tokens,
    "LlavaNextForConditionalGeneration": llava_next.image_tokens,
    "LlavaNextVideoForConditionalGeneration": llava_next.image_tokens,   # its images are LLaVA-NeXT's
}


def _lookup(table: dict, model, caller: str):
    """The entry of ``model``'s class, or of the nearest supported class it derives from."""
    for cls in type(model).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    raise TypeError(f"{caller} supports {', '.join(table)}; got {type(model).__name__}")


def apply_desap(model: nn.Module, keep: int = DEFAULTS.keep,
                task_ratio: Union[float, Literal["auto"]] = DEFAULTS.task_ratio, merge: bool = DEFAULTS.merge, *,
                text_reduce: str = DEFAULTS.text_reduce, exclude_token_ids=DEFAULTS.exclude_token_ids,
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
        task_ratio, merge, text_reduce, backend, text_budget: as in :func:`desap_ops.prune`
            (``task_ratio="auto"``: each image's split read from its own task scores;
            ``text_budget=M``: at most M text tokens per image take part).
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
            placeholders, positions and merging are the same for every method.
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
    install = _lookup(PATCHERS, model, "apply_desap")
    compat.check_version()
    compat.check_hooks(model, _lookup(HOOKS, model, "apply_desap"))
    remove_desap(model)
    ignored = config_ignored_ids(model.config, getattr(model, "generation_config", None), exclude_token_ids)
    prune = PruneOptions.checked(keep, task_ratio, merge, text_reduce, backend, text_budget, method, ideal=ideal)
    markers = as_chat_markers(chat)
    tokenizer = None if chat is None or isinstance(chat, ChatMarkers) else chat
    install(model, DesapState(Options(**vars(prune), ignored_ids=frozenset(ignored), chat=markers,
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
    return _lookup(IMAGE_TOKEN_COUNTS, model, "image_token_counts")(model, pixel_values, image_sizes)
