"""DeSAP's options in vLLM: the engine's (``hf_overrides``) and a request's (``mm_processor_kwargs``).

``LLM(model, hf_overrides={"desap": {"keep": 64, "task_ratio": 0.5}})`` and
``vllm serve MODEL --hf-overrides '{"desap": {"keep": 64}}'`` put the dict on the model's config
as ``config.desap``. Its keys are ``apply_desap``'s options by the same names; ``chat`` is
``true`` (the default: the markers read from the tokenizer's chat template, which vLLM always has,
so an image reads its own user turn's words and never role words or a system prompt), ``false``
(no markers: the text after the image, or before it where nothing follows) or ``{"user": [[ids]],
"assistant": [[ids]], "other": [[ids]]}``. ``max_keep`` is the largest ``keep`` a request may ask for (default:
the engine's ``keep``), and ``ideal: true`` keeps each image's first ``keep`` tokens, unscored and
unmerged (the benchmark's ideal). ``method`` is the pruning method (``desap_ops.methods``: a
built-in or a plugin's); ``methods`` limits the ones a request may ask for (default: any registered).

A request may override ``REQUEST_OPTIONS`` with ``mm_processor_kwargs={"desap": {...}}``
(:func:`request_options`); the rest are the engine's alone. The resolved options travel with each
image as a small tensor (:func:`encode_request`), because vLLM carries per-item data as tensors.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch

from ...methods import get_method, method_by_code, method_code
from ...reference import AUTO
from ...validation import TEXT_REDUCTIONS, check_keep, check_options, check_text_budget
from ..common.pruning import DEFAULTS as PRUNE_DEFAULTS, PruneOptions, check_merge_option

# the engine's options and their defaults: the prune's (common.pruning.DEFAULTS, apply_desap's) and the
# engine's own (chat reads the tokenizer's template by default, which vLLM always has)
DEFAULTS = {**asdict(PRUNE_DEFAULTS), "chat": True, "max_keep": None, "methods": None}
# what one request may set; the order is that of encode_request's tensor
REQUEST_OPTIONS = ("keep", "task_ratio", "merge", "text_reduce", "text_budget", "method")
ENGINE = 'hf_overrides["desap"]'
REQUEST = 'mm_processor_kwargs["desap"]'


@dataclass(frozen=True)
class DesapOptions(PruneOptions):
    """The prune's options (``common.pruning.PruneOptions``: apply_desap's by the same names) and
    the engine's own."""

    ideal: bool          # the engine runs the ideal (the method "first", unmerged): requests may ask for no other
    exclude_token_ids: tuple[int, ...]
    chat: Any            # None (no markers), True (read from the tokenizer's template) or a dict of marker lists
    max_keep: int        # the largest keep a request may ask for
    methods: Optional[tuple[str, ...]]   # the methods a request may ask for; None: any registered


def read_options(hf_config) -> Optional[DesapOptions]:
    """The checked options of ``hf_config.desap``; None when DeSAP is not asked for."""
    raw = getattr(hf_config, "desap", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"{ENGINE} must be a dict of DeSAP options, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{ENGINE} has unknown option(s) {unknown}; the options are {sorted(DEFAULTS)}")
    given = {**DEFAULTS, **raw}
    excluded = given["exclude_token_ids"]
    if not isinstance(excluded, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in excluded):
        raise TypeError(f'{ENGINE}["exclude_token_ids"] must be a list of int token ids, got {excluded!r}')
    chat = given["chat"]
    if chat not in (None, True, False) and not isinstance(chat, dict):
        raise TypeError(f'{ENGINE}["chat"] must be true, false or a dict of marker lists, got {chat!r}')
    if not isinstance(given["ideal"], bool):
        raise TypeError(f'{ENGINE}["ideal"] must be true or false, got {given["ideal"]!r}')
    try:
        prune = PruneOptions.checked(given["keep"], given["task_ratio"], given["merge"], given["text_reduce"],
                                     given["backend"], given["text_budget"], given["method"], ideal=given["ideal"])
    except (TypeError, ValueError) as error:
        raise type(error)(f"{ENGINE}: {error}") from None
    return DesapOptions(**vars(prune), ideal=given["ideal"], exclude_token_ids=tuple(excluded), chat=chat or None,
                        max_keep=_max_keep(given["max_keep"], prune.keep),
                        methods=_allowed_methods(given["methods"], prune.method))


def _allowed_methods(methods, method: str) -> Optional[tuple[str, ...]]:
    if methods is None:
        return None
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, str) for m in methods):
        raise TypeError(f'{ENGINE}["methods"] must be a list of method names, got {methods!r}')
    try:
        allowed = tuple(sorted({get_method(m).name for m in methods}))
    except ValueError as error:
        raise ValueError(f'{ENGINE}["methods"]: {error}') from None
    if method not in allowed:
        raise ValueError(f'{ENGINE}["methods"] = {list(methods)} leaves out the engine\'s own method {method!r}')
    return allowed


def _max_keep(max_keep, keep: int) -> int:
    if max_keep is None:
        return keep
    try:
        max_keep = check_keep(max_keep)
    except (TypeError, ValueError) as error:
        raise type(error)(f'{ENGINE}["max_keep"]: {error}') from None
    if max_keep < keep:
        raise ValueError(f'{ENGINE}["max_keep"] ({max_keep}) must be at least the engine\'s keep ({keep})')
    return max_keep


def request_options(engine: DesapOptions, raw: Optional[Mapping]) -> DesapOptions:
    """``engine``'s options with one request's ``mm_processor_kwargs["desap"]`` (``raw``; None: none)
    over them. Anything wrong is a ValueError naming the option, which vLLM's server answers with
    a 400 before the request reaches the engine."""
    if raw is None:
        return engine
    if not isinstance(raw, Mapping):
        raise ValueError(f"{REQUEST} must be a dict of DeSAP options, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{REQUEST} has unknown option(s) {unknown}; a request may set {list(REQUEST_OPTIONS)}")
    engine_only = sorted(set(raw) - set(REQUEST_OPTIONS))
    if engine_only:
        raise ValueError(f"{REQUEST} sets {engine_only}, which only the engine sets ({ENGINE}); "
                         f"a request may set {list(REQUEST_OPTIONS)}")
    given = {name: raw.get(name, getattr(engine, name)) for name in REQUEST_OPTIONS}
    try:
        keep, task_ratio, _, text_reduce = check_options(given["keep"], given["task_ratio"], True,
                                                         given["text_reduce"])
        merge = check_merge_option(given["merge"])   # None: the method's own default (PruneOptions.merges)
        text_budget = check_text_budget(given["text_budget"])
        method = get_method(given["method"]).name
    except (TypeError, ValueError) as error:
        raise ValueError(f"{REQUEST}: {error}") from None
    if keep > engine.max_keep:
        raise ValueError(f'{REQUEST}["keep"] is {keep}, above the most this engine allows, '
                         f'{ENGINE}["max_keep"] = {engine.max_keep}')
    if method != engine.method and engine.ideal:
        raise ValueError(f'{REQUEST}["method"] is {method!r}, but this engine runs the ideal ({ENGINE}["ideal"]), '
                         f'which is the method {engine.method!r}')
    if engine.methods is not None and method not in engine.methods:
        raise ValueError(f'{REQUEST}["method"] is {method!r}, which this engine does not allow; '
                         f'{ENGINE}["methods"] = {list(engine.methods)}')
    # the ideal never merges: a request's merge has no effect on it
    return replace(engine, keep=int(keep), task_ratio=task_ratio, merge=False if engine.ideal else merge,
                   text_reduce=text_reduce, text_budget=text_budget, method=method)


def encode_request(options: DesapOptions) -> torch.Tensor:
    """(6,) float64, ``REQUEST_OPTIONS`` in order: "auto" as NaN, ``merge`` None (the method's
    own default) as NaN, ``text_reduce`` as its index in
    ``TEXT_REDUCTIONS``, no ``text_budget`` as 0 (a budget is at least 1), the method as its
    ``method_code`` (a 32-bit number: every process that loaded the same methods decodes it alike).
    Exact for every value."""
    return torch.tensor([options.keep, math.nan if options.task_ratio == AUTO else options.task_ratio,
                         math.nan if options.merge is None else float(options.merge),
                         TEXT_REDUCTIONS.index(options.text_reduce),
                         options.text_budget or 0, method_code(options.method)], dtype=torch.float64)


def decode_request(engine: DesapOptions, encoded: torch.Tensor) -> DesapOptions:
    """The options :func:`encode_request` encoded, over ``engine``'s engine-wide ones."""
    keep, task_ratio, merge, reduce, text_budget, method = encoded.reshape(-1).tolist()
    return replace(engine, keep=int(keep), task_ratio=AUTO if math.isnan(task_ratio) else task_ratio,
                   merge=None if math.isnan(merge) else bool(merge), text_reduce=TEXT_REDUCTIONS[int(reduce)],
                   text_budget=int(text_budget) or None, method=method_by_code(int(method)).name)
