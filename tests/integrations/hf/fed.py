"""What a patched model fed its language model, read through hooks on the language model's input
(documented module calls), never through output fields that transformers may rename."""
from contextlib import contextmanager

import torch


@contextmanager
def language_model_input(model):
    """Record the (shortened) ``input_ids`` the multimodal model ran on and the ``inputs_embeds``
    its language model received, for the last forward inside the block."""
    seen = {}

    def ids_hook(module, args, kwargs):
        seen["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

    def embeds_hook(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    handles = [model.model.register_forward_pre_hook(ids_hook, with_kwargs=True),
               model.model.language_model.register_forward_pre_hook(embeds_hook, with_kwargs=True)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def fed_rows(seen: dict, token_id: int, row: int = None) -> torch.Tensor:
    """The language model's input rows at the placeholders of ``token_id`` (of one batch row)."""
    ids, embeds = seen["input_ids"], seen["inputs_embeds"]
    if row is not None:
        ids, embeds = ids[row], embeds[row]
    return embeds[ids == token_id]
