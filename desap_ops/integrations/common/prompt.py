"""Which prompt tokens never count as the text DeSAP's task score reads, in both engines.

Each image (or video) reads the text tokens :func:`sequence.image_text_tokens` picks for it,
never the ids of :func:`config_ignored_ids` (placeholders, the markers around them, padding, BOS,
EOS, and the caller's own).
"""
from __future__ import annotations

from typing import Iterable

STRUCTURAL_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def config_ignored_ids(config, generation_config=None, extra: Iterable[int] = ()) -> set[int]:
    """Token ids that never count as prompt text, read from a model's config and generation
    config (an object or a dict): image/video placeholders, the markers around them, padding,
    BOS, EOS, and the caller's ``extra``."""
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
