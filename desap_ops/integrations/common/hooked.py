"""A name an engine's patch uses inside the library it patches (a transformers model internal, a
vLLM function or class), with what the patch expects of it: one type for both engines. Each
engine looks its hooks up and checks them its own way (``hf.compat.check_hooks``,
``vllm.hooks.hook_problem``); the fields past ``params`` are read by vLLM's checks alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def _names(value, field: str) -> None:
    if not isinstance(value, tuple) or not all(isinstance(name, str) for name in value):
        raise TypeError(f"Hook.{field} must be a tuple of names (str), got {value!r}")


@dataclass(frozen=True)
class Hook:
    """``target``: where the name is: transformers, a dotted path from the model
    (``model.model.get_image_features``) or a module-level name
    (``transformers.vision_utils.get_vision_window_index``); vLLM, ``module:Class.attribute`` or
    ``registry:Arch.attribute``. ``params``: None, the parameters are not checked (only that the
    name exists); a tuple, these parameter names must be accepted (vLLM: after self, "**kwargs" for
    a catch-all; with ``exact``, exactly these, in this order)."""

    target: str
    params: Optional[tuple[str, ...]] = None
    exact: bool = False                # the engine calls the patch's override: its names must match exactly
    reads: tuple[str, ...] = ()        # names the target's source must use (a flag the engine reads)
    # wiring (``vllm.hooks.wiring_problem``): dotted names the target's body uses (calls or attribute
    # reads, matched on whole trailing components: "mm_pruner.recompute" matches
    # self.mm_pruner.recompute), each first used after the one before it in source order
    calls_in_order: tuple[str, ...] = ()
    # names the target function looks up in the globals of the target's module, where the plugin
    # replaces them: used there as a bare name, bound neither in the function nor by a move of the
    # function to another module
    module_globals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise TypeError(f"Hook.target must be a non-empty name (str), got {self.target!r}")
        if self.params is not None:
            _names(self.params, "params")
        if not isinstance(self.exact, bool):
            raise TypeError(f"Hook.exact must be True or False, got {self.exact!r}")
        if self.exact and self.params is None:
            raise ValueError(f"Hook {self.target}: exact needs the params to match (got params=None)")
        for field in ("reads", "calls_in_order", "module_globals"):
            _names(getattr(self, field), field)
