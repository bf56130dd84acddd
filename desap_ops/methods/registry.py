"""The method registry: where methods are found (the built-ins, :func:`register_method`, and the
entry-point group ``desap_ops.methods``, read once per registry on its first use). The module's
functions use one registry per process (:data:`DEFAULT_REGISTRY`); a test makes a fresh one with
:class:`MethodRegistry`. The interface's types live in ``interface``."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import AbstractSet, Optional, Union

from .builtin import BUILTIN
from .interface import (DEFAULT_METHOD, DEFAULT_READS, SIGNALS, Method, MethodFailure, MethodInputs,  # noqa: F401
                        PruneFn, Selection, SelectFn, Signal, check_name, check_reads, method_code)

ENTRY_POINT_GROUP = "desap_ops.methods"


class MethodRegistry:
    """Registered methods by name: ``builtins`` and, on the first lookup or registration, every
    method of the entry-point ``group`` (None: none). One that fails to load, or clashes with a
    registered name, is a RuntimeError naming it, on that lookup and on every later one: a process
    never runs on with some of its methods silently missing. Safe to use from several threads."""

    def __init__(self, builtins: Iterable[Method] = BUILTIN, group: Optional[str] = ENTRY_POINT_GROUP):
        self._builtins = tuple(builtins)
        self._group = group
        self._methods: dict[str, Method] = {}
        self._lock = threading.RLock()   # re-entered by a plugin that registers its methods as it is imported
        self._loaded = False             # the built-ins and the entry points are registered
        self._loading = False            # they are being registered (under the lock)
        self._load_error: Optional[str] = None   # why the entry points failed to load: raised on every lookup

    def add(self, method: Method) -> None:
        """Register ``method``; a ValueError if its name, or its :func:`method_code`, is taken."""
        if not isinstance(method, Method):
            raise TypeError(f"method must be a desap_ops.methods.Method, got {type(method).__name__}")
        self._load()
        self._insert(method)

    def register(self, name: str, select: Optional[SelectFn] = None, *,
                 reads: AbstractSet[Union[Signal, str]] = DEFAULT_READS, prune: Optional[PruneFn] = None,
                 merges: bool = True):
        """See :func:`register_method`."""
        check_name(name)
        reads = check_reads(name, reads)
        if select is None and prune is None:
            return lambda fn: self.register(name, fn, reads=reads, merges=merges)
        self.add(Method(name, select, reads, prune, merges=merges))
        return select if prune is None else prune

    def unregister(self, name: str) -> None:
        """Forget the method ``name`` (tests; a built-in cannot be removed)."""
        if name in {method.name for method in self._builtins}:
            raise ValueError(f"{name!r} is a built-in method and stays registered")
        with self._lock:
            self._methods.pop(name, None)

    def names(self) -> list[str]:
        """Every registered method's name, sorted."""
        self._load()
        return sorted(self._methods)

    def get(self, name) -> Method:
        """The method ``name``; a ValueError naming it and the registered ones when there is none."""
        self._load()
        if not isinstance(name, str):
            raise TypeError(f"method must be a method name (str), got {type(name).__name__} {name!r}")
        try:
            return self._methods[name]
        except KeyError:
            raise ValueError(f"method {name!r} is not a registered pruning method; registered: "
                             f"{sorted(self._methods)}") from None

    def by_code(self, code: int) -> Method:
        """The registered method whose :func:`method_code` is ``code``."""
        self._load()
        for method in self._methods.values():
            if method.code == code:
                return method
        raise ValueError(f"no registered pruning method has code {code}; registered: {sorted(self._methods)}")

    def _insert(self, method: Method) -> None:
        with self._lock:
            if method.name in self._methods:
                raise ValueError(f"a pruning method named {method.name!r} is already registered")
            clash = [m.name for m in self._methods.values() if m.code == method.code]
            if clash:
                raise ValueError(f"method name {method.name!r} has the same code as {clash[0]!r}; choose another name")
            self._methods[method.name] = method

    def _load(self) -> None:
        """Register the built-ins and every method of the entry points, once."""
        if self._loaded and self._load_error is None:
            return
        from importlib.metadata import entry_points

        with self._lock:
            if self._load_error is not None:
                raise RuntimeError(self._load_error)
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for method in self._builtins:
                    self._insert(method)
                failures = []
                for point in entry_points(group=self._group) if self._group is not None else ():
                    try:
                        self._insert(_entry_point_method(point))
                    except Exception as error:
                        failures.append(f"pruning method {point.name!r} ({point.value}, entry point group "
                                        f"{self._group!r}) failed to load: {error!r}")
                if failures:
                    self._load_error = "; ".join(failures)
                    raise RuntimeError(self._load_error)
            finally:
                self._loading = False
                self._loaded = True


def _entry_point_method(point) -> Method:
    """The method an entry point names: a :class:`Method` of the entry point's name, or a select
    function (which then reads :data:`DEFAULT_READS`, every signal but the seed)."""
    target = point.load()
    if isinstance(target, Method):
        if target.name != point.name:
            raise ValueError(f"the entry point names the method {target.name!r}: the two names must agree")
        return target
    if not callable(target):
        raise TypeError(f"an entry point must name a Method or a select function, got {type(target).__name__}")
    return Method(point.name, target)


DEFAULT_REGISTRY = MethodRegistry()   # the process's registry, which the functions below and the engines use


def register_method(name: str, select: Optional[SelectFn] = None, *,
                    reads: AbstractSet[Union[Signal, str]] = DEFAULT_READS, prune: Optional[PruneFn] = None,
                    merges: bool = True):
    """Register a pruning method ``name`` (lower-case letters, digits, ``_.-``) of one of two kinds:

    - ``select(inputs: MethodInputs)`` returns the kept indices (B, K), ascending, or a
      :class:`Selection` with an assignment too; the engines merge (or gather) the tokens;
    - ``prune=fn``: ``fn(inputs: MethodInputs, merge: bool)`` does the whole step and returns a
      :class:`~desap_ops.reference.PruneResult` (tokens (B, K, D), indices (B, K) ascending,
      assignment (B, N), task scores or None), which is checked.

    ``reads`` names the signals it uses (:class:`Signal`s or their names); the engines compute only
    those. ``merges``: whether it merges its dropped tokens by default (the engines' ``merge``
    option, left at None). Used with neither function it is a decorator of a select function.
    Returns the function."""
    return DEFAULT_REGISTRY.register(name, select, reads=reads, prune=prune, merges=merges)


def unregister_method(name: str) -> None:
    """Forget the method ``name`` (tests; a built-in cannot be removed)."""
    DEFAULT_REGISTRY.unregister(name)


def available_methods() -> list[str]:
    """Every registered method's name, sorted."""
    return DEFAULT_REGISTRY.names()


def get_method(name) -> Method:
    """The method ``name``; a ValueError naming it and the registered ones when there is none."""
    return DEFAULT_REGISTRY.get(name)


def method_by_code(code: int) -> Method:
    """The registered method whose :func:`method_code` is ``code``."""
    return DEFAULT_REGISTRY.by_code(code)
