"""The one skeleton every benchmark of ``desap bench`` follows. A benchmark module exposes five
functions, one per step, and :func:`execute` runs them in order:

    check(args) -> None            the arguments alone, nothing loaded (UsageError on a mistake)
    plan(args) -> Plan             the run resolved against the model or the device (UsageError)
    run(plan, progress) -> Result  the measurements, a dataclass
    table(result) -> str           what the command prints
    figure(result) -> Figure       what ``--plot`` draws

then writes the result as JSON (``--out``) and the figure as a PNG (``--plot``). Every mistake a
person can fix is refused before anything runs (the checks live in :mod:`.arguments`); a run that
fails in a process of its own (:class:`RunFailed`) prints its log's last lines and returns 1.

Results are dataclasses read by attribute; :func:`to_json` writes their fields under their names
(a field may carry another JSON name, :func:`named`; be left out while it is None, :func:`optional`;
or have its own fields written in its parent's place, :func:`flattened`), so the JSON files keep one
layout that the docs and ``bench/results`` cite; :func:`from_json` reads them back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import types
import typing
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from .arguments import check_outputs

if TYPE_CHECKING:
    from argparse import Namespace

    from matplotlib.figure import Figure

Progress = Callable[[str], None]

_JSON_NAME, _OMIT_NONE, _FLATTEN = "json_name", "omit_none", "flatten"


class Benchmark(Protocol):
    """What :func:`execute` needs of a benchmark module (``desap_ops.benchmarks.op`` and the others)."""

    def check(self, args: Namespace) -> None: ...

    def plan(self, args: Namespace) -> Any: ...

    def run(self, plan: Any, progress: Optional[Progress] = None) -> Any: ...

    def table(self, result: Any) -> str: ...

    def figure(self, result: Any) -> Figure: ...


class RunFailed(Exception):
    """A run in a process of its own exited with an error; ``tail``: the last lines of its log."""

    def __init__(self, message: str, tail: list[str]):
        super().__init__(message)
        self.tail = tail


def execute(bench: Benchmark, args: Namespace, progress: Optional[Progress] = None) -> int:
    """Check, plan, run, print the table, write ``args.out`` (JSON) and ``args.plot`` (PNG); 0 on
    success, 1 for a failed run (its log's tail printed). UsageError passes to the caller."""
    check_outputs(args.out, args.plot)
    bench.check(args)
    plan = bench.plan(args)
    try:
        result = bench.run(plan, progress)
    except RunFailed as err:
        print("\n".join(err.tail), file=sys.stderr)
        print(f"desap: error: {err}", file=sys.stderr)
        return 1
    print(bench.table(result))
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        bench.figure(result).savefig(args.plot)
        print(f"wrote {args.plot}")
    return 0


# --- defaults every benchmark shares ------------------------------------------------------------

def paper_budgets(tokens: int) -> list[int]:
    """The paper's budgets for ``tokens`` image tokens, largest first: N/3, 2N/9 and N/9 (192, 128
    and 64 of LLaVA-1.5's 576)."""
    return sorted({tokens // 3, 2 * tokens // 9, tokens // 9} - {0}, reverse=True)


def command_line(words: str, options: list[tuple[str, object]]) -> str:
    """The command as typed when ``desap`` runs from a shell (``words``: "bench vllm"), else
    ``options`` written out (None, empty and False values left out)."""
    split = words.split()
    if sys.argv[1:1 + len(split)] == split:
        return shlex.join(["desap", *sys.argv[1:]])
    parts = ["desap", *split]
    for option, value in options:
        if value not in (None, "", False):
            parts += [option] if value is True else [option, str(value)]
    return shlex.join(parts)


# --- results as JSON ---------------------------------------------------------------------------------

def optional(json_name: Optional[str] = None, **kwargs: Any) -> Any:
    """A result field that JSON leaves out while it is None (default None)."""
    metadata = {_OMIT_NONE: True, **({_JSON_NAME: json_name} if json_name else {})}
    return dataclasses.field(default=kwargs.pop("default", None), metadata=metadata, **kwargs)


def named(json_name: str, **kwargs: Any) -> Any:
    """A result field written under another JSON name (one Python cannot use, such as ``with``)."""
    return dataclasses.field(metadata={_JSON_NAME: json_name}, **kwargs)


def flattened(**kwargs: Any) -> Any:
    """A result field (a dataclass) whose own fields JSON writes among its parent's."""
    return dataclasses.field(metadata={_FLATTEN: True}, **kwargs)


def to_json(value: Any) -> Any:
    """``value`` as JSON data: dataclasses as objects of their fields (see :func:`optional`,
    :func:`named` and :func:`flattened`), tuples as lists, everything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if item is None and field.metadata.get(_OMIT_NONE):
                continue
            if field.metadata.get(_FLATTEN):
                out.update(to_json(item))
            else:
                out[field.metadata.get(_JSON_NAME, field.name)] = to_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def from_json(kind: Any, data: Any) -> Any:
    """``data`` (as :func:`to_json` wrote it, or read back from a file) as an instance of ``kind``:
    dataclasses field by field, ``list[X]``, ``dict[K, X]`` (JSON's string keys turned back into
    ``K``), ``Optional[X]``; anything else as it is."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if data is None:
        return None
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        values = {}
        for field in dataclasses.fields(kind):
            if field.metadata.get(_FLATTEN):
                values[field.name] = from_json(hints[field.name], data)
                continue
            name = field.metadata.get(_JSON_NAME, field.name)
            if name in data:
                values[field.name] = from_json(hints[field.name], data[name])
        return kind(**values)
    if origin in (typing.Union, types.UnionType):   # Optional[X]: X; a union of several: as it is
        inner = [a for a in args if a is not type(None)]
        return from_json(inner[0], data) if len(inner) == 1 else data
    if origin is list:
        return [from_json(args[0], item) for item in data] if args else list(data)
    if origin is dict:
        key, value = args or (Any, Any)
        return {(key(k) if key in (int, float) else k): from_json(value, v) for k, v in data.items()}
    return data


def write_json(result: Any, path: str | os.PathLike) -> None:
    """``result`` (:func:`to_json`) to ``path``, indented."""
    with open(path, "w") as handle:
        json.dump(to_json(result), handle, indent=2)
