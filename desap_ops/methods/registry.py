"""The method registry: where methods are found (the built-ins, :func:`register_method`, and the
entry-point group ``desap_ops.methods``, read once per process on first use). The interface's
types live in ``interface``."""
from __future__ import annotations

import re
import threading
from typing import AbstractSet, Optional

from .builtin import BUILTIN, register_builtins
from .interface import (DEFAULT_METHOD, DEFAULT_READS, SIGNALS, Method, MethodFailure, MethodInputs, Selection,  # noqa: F401
                        SelectFn, Signal, method_code)

ENTRY_POINT_GROUP = "desap_ops.methods"
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


_METHODS: dict[str, Method] = {}
_LOCK = threading.RLock()   # re-entered by a plugin that registers its methods as it is imported
_loaded_entry_points = False   # the built-ins and the entry points are registered
_loading = False               # they are being registered (under _LOCK)
_entry_point_error: Optional[str] = None   # why the entry points failed to load: raised on every lookup


def _check_name(name) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"method name must be 1 to 63 lower-case letters, digits, '_', '.' or '-', "
                         f"starting with a letter or digit, got {name!r}")


def _check_reads(name: str, reads) -> frozenset:
    if isinstance(reads, str) or not isinstance(reads, (AbstractSet, list, tuple)) or \
            not all(isinstance(s, str) for s in reads):
        raise TypeError(f"method {name!r}: reads must be a collection of signal names from {sorted(s.value for s in SIGNALS)}, "
                        f"got {reads!r}")
    unknown = sorted(set(reads) - {s.value for s in SIGNALS})
    if unknown:
        raise ValueError(f"method {name!r} reads unknown signal(s) {unknown}; the signals are "
                         f"{sorted(s.value for s in SIGNALS)}")
    return frozenset(Signal(s) for s in reads)


def _add(method: Method) -> None:
    with _LOCK:
        if method.name in _METHODS:
            raise ValueError(f"a pruning method named {method.name!r} is already registered")
        clash = [m.name for m in _METHODS.values() if m.code == method.code]
        if clash:
            raise ValueError(f"method name {method.name!r} has the same code as {clash[0]!r}; choose another name")
        _METHODS[method.name] = method


def register_method(name: str, select: Optional[SelectFn] = None, *,
                    reads: AbstractSet[str] = DEFAULT_READS):
    """Register ``select`` as the pruning method ``name`` (lower-case letters, digits, ``_.-``).

    ``select(inputs: MethodInputs)`` returns the kept indices (B, K), ascending, or a
    :class:`Selection` with an assignment too. ``reads`` names the signals it uses (``SIGNALS``);
    the engines compute only those. Used bare (``select`` None) it is a decorator. Returns ``select``."""
    _check_name(name)
    reads = _check_reads(name, reads)

    def register(fn: SelectFn) -> SelectFn:
        if not callable(fn):
            raise TypeError(f"method {name!r}: select must be callable, got {type(fn).__name__}")
        _load_entry_points()
        _add(Method(name, fn, reads))
        return fn

    return register if select is None else register(select)


def unregister_method(name: str) -> None:
    """Forget the method ``name`` (tests; a built-in cannot be removed)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in method and stays registered")
    with _LOCK:
        _METHODS.pop(name, None)


def _load_entry_points() -> None:
    """Register the built-ins and every method of the ``desap_ops.methods`` entry points, once per
    process. An entry point names either a :class:`Method` (of the entry point's name) or a select
    function (which then reads every signal but the seed). One that fails to load, or clashes with
    a registered name, is a RuntimeError naming it, on this lookup and on every later one: a
    process never runs on with some of its methods silently missing."""
    global _loaded_entry_points, _loading, _entry_point_error
    if _loaded_entry_points and _entry_point_error is None:
        return
    from importlib.metadata import entry_points

    with _LOCK:
        if _entry_point_error is not None:
            raise RuntimeError(_entry_point_error)
        if _loaded_entry_points or _loading:
            return
        _loading = True
        try:
            register_builtins(_add)
            failures = []
            for point in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    _add(_entry_point_method(point))
                except Exception as error:
                    failures.append(f"pruning method {point.name!r} ({point.value}, entry point group "
                                    f"{ENTRY_POINT_GROUP!r}) failed to load: {error!r}")
            if failures:
                _entry_point_error = "; ".join(failures)
                raise RuntimeError(_entry_point_error)
        finally:
            _loading = False
            _loaded_entry_points = True


def _entry_point_method(point) -> Method:
    """The method an entry point names, checked as :func:`register_method` checks one."""
    target = point.load()
    _check_name(point.name)
    if isinstance(target, Method):
        if target.name != point.name:
            raise ValueError(f"the entry point names the method {target.name!r}: the two names must agree")
        select, reads = target.select, _check_reads(target.name, target.reads)
    else:
        select, reads = target, DEFAULT_READS
    if not callable(select):
        raise TypeError(f"an entry point must name a Method or a select function, got {type(select).__name__}")
    return Method(point.name, select, reads)


def available_methods() -> list[str]:
    """Every registered method's name, sorted."""
    _load_entry_points()
    return sorted(_METHODS)


def get_method(name) -> Method:
    """The method ``name``; a ValueError naming it and the registered ones when there is none."""
    _load_entry_points()
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {type(name).__name__} {name!r}")
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is not a registered pruning method; registered: "
                         f"{sorted(_METHODS)}") from None


def method_by_code(code: int) -> Method:
    """The registered method whose :func:`method_code` is ``code``."""
    _load_entry_points()
    for method in _METHODS.values():
        if method.code == code:
            return method
    raise ValueError(f"no registered pruning method has code {code}; registered: {sorted(_METHODS)}")
