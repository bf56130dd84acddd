"""DeSAP's options in vLLM: the ``desap`` entry of ``hf_overrides``, read and checked once.

``LLM(model, hf_overrides={"desap": {"keep": 64, "task_ratio": 0.5}})`` and
``vllm serve MODEL --hf-overrides '{"desap": {"keep": 64}}'`` put the dict on the model's config
as ``config.desap``. Its keys are ``apply_desap``'s options by the same names; ``chat`` is
``true`` (the markers read from the model's tokenizer) or ``{"user": [[ids]], "assistant":
[[ids]], "other": [[ids]]}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from ...validation import check_backend, check_options, check_text_budget

DEFAULTS = dict(keep=64, task_ratio=0.5, merge=True, text_reduce="max", backend="auto", text_budget=None,
                exclude_token_ids=(), chat=None)


@dataclass(frozen=True)
class DesapOptions:
    keep: int
    task_ratio: Union[float, str]
    merge: bool
    text_reduce: str
    backend: str
    text_budget: Optional[int]
    exclude_token_ids: tuple[int, ...]
    chat: Any            # None, True (read from the tokenizer) or a dict of marker lists

    def operator_options(self) -> dict:
        """The keyword arguments of ``desap_ops.prune`` these options set (all but keep)."""
        return dict(task_ratio=self.task_ratio, merge=self.merge, text_reduce=self.text_reduce,
                    backend=self.backend, text_budget=self.text_budget)


def read_options(hf_config) -> Optional[DesapOptions]:
    """The checked options of ``hf_config.desap``; None when DeSAP is not asked for."""
    raw = getattr(hf_config, "desap", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f'hf_overrides["desap"] must be a dict of DeSAP options, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f'hf_overrides["desap"] has unknown option(s) {unknown}; the options are {sorted(DEFAULTS)}')
    given = {**DEFAULTS, **raw}
    keep, task_ratio, merge, text_reduce = check_options(given["keep"], given["task_ratio"], given["merge"],
                                                         given["text_reduce"])
    excluded = given["exclude_token_ids"]
    if not isinstance(excluded, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in excluded):
        raise TypeError(f'hf_overrides["desap"]["exclude_token_ids"] must be a list of int token ids, got {excluded!r}')
    chat = given["chat"]
    if chat not in (None, True, False) and not isinstance(chat, dict):
        raise TypeError(f'hf_overrides["desap"]["chat"] must be true or a dict of marker lists, got {chat!r}')
    return DesapOptions(keep=keep, task_ratio=task_ratio, merge=merge, text_reduce=text_reduce,
                        backend=check_backend(given["backend"]), text_budget=check_text_budget(given["text_budget"]),
                        exclude_token_ids=tuple(excluded), chat=chat or None)
