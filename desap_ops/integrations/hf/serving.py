"""How a patched model serves a call, for every family.

- The patch: methods replaced by instance attributes that show the replaced method's signature
  (``install_methods``), and undone again (``uninstall_methods``).
- ``forward`` and ``generate``: a family's ``prepare`` step rewrites the call's arguments (shrinks
  the placeholder runs, or plans the pruning) before the model's own method runs.
- ``run_prune``: the one place a patched model prunes (``common.pruning.prune_images``, with the
  options stored on it), each image's record (``common.record``) added to those ``last_prune`` reads.
"""
from __future__ import annotations

import inspect
import types
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ...methods import TokenGrid
from ...reference import PruneResult
from ..common.pruning import prune_images
from ..common.record import records_of, warn_if_text_blind
from ..common.sequence import count_placeholders, first_placeholders, image_budget, shrink_placeholders
from ..common.signals import TowerSignals
from .state import CallContext, DesapState, Prompt, SavedAttribute

# prepare(model, arguments, generating): rewrite a call's arguments (by name) in place
Prepare = Callable[[nn.Module, dict, bool], None]


# --- the patch ----------------------------------------------------------------------------------

def bind_like(owner: nn.Module, function: Callable, name: str) -> types.MethodType:
    """``function`` as a method of ``owner`` that shows the signature of the method ``name`` it
    replaces (generate validates its keyword arguments against the signature of ``forward``)."""
    def method(self, *args, **kwargs):
        return function(self, *args, **kwargs)

    method.__signature__ = inspect.signature(getattr(type(owner), name))
    method.__name__ = name
    return types.MethodType(method, owner)


def install_methods(model: nn.Module, state: DesapState, replacements) -> None:
    """Set ``state`` on ``model`` and each of ``replacements`` ((owner, name, function(self, ...)),
    ...) as an instance attribute, saving what it shadows (to call and to restore)."""
    state.patch.saved = [SavedAttribute(owner, name, owner.__dict__.get(name)) for owner, name, _ in replacements]
    state.patch.originals = {name: getattr(owner, name) for owner, name, _ in replacements}
    model._desap = state
    for owner, name, function in replacements:
        setattr(owner, name, bind_like(owner, function, name))


def uninstall_methods(model: nn.Module) -> None:
    """Undo :func:`install_methods`: the model's own methods again, and no state left on it."""
    for owner, name, previous in model._desap.patch.saved:
        owner.__dict__.pop(name, None)
        if previous is not None:  # an instance attribute that was there before apply_desap
            setattr(owner, name, previous)
    del model._desap


def install_serving(model: nn.Module, state: DesapState, prepare: Prepare, *replacements) -> None:
    """Patch ``model``: ``forward`` and ``generate`` run ``prepare`` first, plus ``replacements``
    (the family's vision side) as for :func:`install_methods`."""
    install_methods(model, state, (
        *replacements,
        (model, "forward", lambda self, *a, **k: serve_forward(self, prepare, *a, **k)),
        (model, "generate", lambda self, *a, **k: serve_generate(self, prepare, *a, **k)),
    ))


# --- serving a call -----------------------------------------------------------------------------

def call_arguments(model: nn.Module, args, kwargs) -> dict:
    """A forward call's arguments by name (as the model's own forward would bind them)."""
    forward = model._desap.patch.originals["forward"]
    arguments = inspect.signature(forward).bind_partial(*args, **kwargs).arguments
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def serve_forward(model: nn.Module, prepare: Prepare, *args, **kwargs):
    """``model.forward`` under DeSAP: prepare the arguments, then run with the prompt known."""
    state: DesapState = model._desap
    arguments = call_arguments(model, args, kwargs)
    try:
        prepare(model, arguments, False)
        state.call.prompt = Prompt(arguments.get("input_ids"), arguments.get("attention_mask"))
        return state.patch.originals["forward"](**arguments)
    finally:
        state.call = CallContext()


def serve_generate(model: nn.Module, prepare: Prepare, *args, **kwargs):
    """``model.generate`` under DeSAP: prepare the prompt once, before the generation loop, so the
    cache, the mask and the positions of every step agree with the pruned prefill."""
    state: DesapState = model._desap
    if args and "input_ids" not in kwargs and isinstance(args[0], torch.Tensor):
        kwargs["input_ids"], args = args[0], args[1:]   # prepare finds the prompt by name
    callers_prompt = kwargs.get("input_ids")
    try:
        prepare(model, kwargs, True)
        # generate may run the encoders before its loop (transformers >= 5.2x): give them the prompt
        state.call.prompt = Prompt(kwargs.get("input_ids"), kwargs.get("attention_mask"))
        output = state.patch.originals["generate"](*args, **kwargs)
    finally:
        state.call = CallContext()
    return with_callers_prompt(output, callers_prompt, kwargs.get("input_ids"))


def with_callers_prompt(output, callers_prompt: Optional[torch.Tensor], served_prompt: Optional[torch.Tensor]):
    """``generate``'s output with the caller's own prompt ids in front of the new tokens, where the
    model was served a shortened prompt: so ``generated[:, input_ids.shape[1]:]``, the idiom of
    every model card, gives the answer. Rows repeat each prompt as generate repeats them (beams,
    ``num_return_sequences``). ``output`` is a tensor or a ModelOutput with ``sequences``."""
    if callers_prompt is None or served_prompt is None or served_prompt is callers_prompt:
        return output
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    repeats = sequences.shape[0] // callers_prompt.shape[0]
    prompt = callers_prompt.to(sequences.device).repeat_interleave(repeats, dim=0)
    restored = torch.cat([prompt, sequences[:, served_prompt.shape[1]:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output


def pad_token_id(model: nn.Module) -> int:
    """The id that pads the rows of a shrunk prompt."""
    pad = model.config.text_config.pad_token_id
    return 0 if pad is None else pad


def shrink_runs(model: nn.Module, arguments: dict, token_id: int, lengths: Sequence[int], what: str,
                generating: bool, budgets: Optional[Sequence[int]] = None) -> None:
    """Keep the first ``budgets[i]`` of the i-th run of ``token_id`` placeholders (``lengths``
    long, in order) in ``arguments``; by default ``sequence.image_budget`` of ``keep``, so a run no
    longer than ``keep`` stays whole. Ids that already hold the budgets pass unchanged. A prompt
    without a mask is padded again on the left for generate and on the right for forward; labels
    shrink in forward only."""
    state: DesapState = model._desap
    input_ids = arguments.get("input_ids")
    if input_ids is None:
        raise ValueError(f"apply_desap needs input_ids (not inputs_embeds) with {what} inputs: "
                         f"the {what} placeholders must be found to shrink them")
    budgets = [image_budget(state.options.keep, n) for n in lengths] if budgets is None else list(budgets)
    state.call.budgets[token_id] = budgets   # the served prompt's runs, for the text side (hf/text.py)
    found = count_placeholders(input_ids, token_id)
    if found == sum(budgets):
        return  # already pruned (e.g. the prefill inside generate), or nothing to prune
    if found != sum(lengths):
        raise ValueError(f"input_ids hold {found} {what} tokens for {len(lengths)} {what}s: expected "
                         f"{sum(lengths)} (the processor's count) or {sum(budgets)} (at most keep per {what})")
    shrunk = shrink_placeholders(
        first_placeholders(lengths, budgets, input_ids.device), token_id, pad_token_id(model), input_ids,
        arguments.get("attention_mask"), None if generating else arguments.get("labels"),
        arguments.get("position_ids"), pad_left=generating)
    for name in ("input_ids", "attention_mask", "labels", "position_ids"):
        if getattr(shrunk, name) is not None:
            arguments[name] = getattr(shrunk, name)


# --- the operator -------------------------------------------------------------------------------

def start_record(model: nn.Module) -> None:
    """Begin the records of a vision pass: the prunes that follow replace the previous pass's."""
    model._desap.records.last = []


def run_prune(model: nn.Module, signals: TowerSignals, text_space: Callable[[torch.Tensor], torch.Tensor],
              text: torch.Tensor, text_mask: torch.Tensor, keep: Optional[int] = None,
              grid: Optional[TokenGrid] = None) -> PruneResult:
    """Prune the images of ``signals`` ((B, N, .)) with the options apply_desap stored on ``model``
    (``keep`` overrides the budget; ``text_space`` maps the attention branch into the text's space,
    see ``common.pruning.prune_images``); each image's record is added to those of the pass
    started by :func:`start_record`. ``grid``: where the tokens lie (None: one square)."""
    state: DesapState = model._desap
    options = state.options
    result = prune_images(signals, text_space, text, text_mask, options.keep if keep is None else keep, options, grid)
    records = records_of(result, signals.saliency, text_mask.sum(dim=1), options.method)
    state.records.last.extend(records)
    state.records.told_text_blind = warn_if_text_blind(records, options.reads, state.records.told_text_blind)
    return result
