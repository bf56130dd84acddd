"""What a patched model fed its language model, read through hooks on the model's and the language
model's input (documented module calls), never through output fields that transformers may rename.
The one such helper of the tests (LLaVA, Qwen and the docs' snippets)."""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class LanguageModelInput:
    """The last forward's: the (shortened) ``input_ids`` the multimodal model ran on, and what its
    language model was called with."""

    input_ids: Optional[torch.Tensor] = None
    inputs_embeds: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None          # the Qwen models: (3 or 4, B, T)
    deepstack_visual_embeds: Optional[list] = None       # Qwen3-VL's DeepStack levels


@contextmanager
def language_model_input(model) -> Iterator[LanguageModelInput]:
    """Record what the language model of ``model`` is fed, for the last forward inside the block."""
    seen = LanguageModelInput()

    def ids_hook(module, args, kwargs):
        seen.input_ids = kwargs.get("input_ids", args[0] if args else None)

    def language_model_hook(module, args, kwargs):
        seen.inputs_embeds = kwargs["inputs_embeds"]
        seen.position_ids = kwargs.get("position_ids")
        seen.deepstack_visual_embeds = kwargs.get("deepstack_visual_embeds")

    handles = [model.model.register_forward_pre_hook(ids_hook, with_kwargs=True),
               model.model.language_model.register_forward_pre_hook(language_model_hook, with_kwargs=True)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def fed_rows(seen: LanguageModelInput, token_id: int, row: Optional[int] = None) -> torch.Tensor:
    """The language model's input rows at the placeholders of ``token_id`` (of one batch row)."""
    ids, embeds = seen.input_ids, seen.inputs_embeds
    if row is not None:
        ids, embeds = ids[row], embeds[row]
    return embeds[ids == token_id]
