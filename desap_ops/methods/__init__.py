"""Pruning methods: which of an image's tokens are kept, chosen by a pluggable function.

DeSAP (``"desap"``, the contract and the kernels) is the default; beside it ship the baselines the
field compares it with (``builtin``): ``first``, ``random``, ``saliency``, ``similarity``,
``divprune``, ``dart-input``, ``cdpruner-lm`` (module ``redundancy``), ``visionzip`` (module
``visionzip``) and ``hiprune``. A method either selects the kept tokens
(``Method.select``) or prunes the whole step itself (``Method.prune``, as DeSAP and VisionZip
do). ``register_method`` adds one, and so does the entry-point group ``desap_ops.methods`` (so that
a package of methods is found in every process of a serving engine). Whatever the method, the
engines do the rest alike: the budget, the placeholders, positions, DeepStack levels, merging and
the cache key.
"""
from .builtin import BUILTIN
from .registry import (DEFAULT_METHOD, DEFAULT_REGISTRY, ENTRY_POINT_GROUP, SIGNALS, Method, MethodFailure,
                       MethodInputs, MethodRegistry, Selection, Signal, available_methods, get_method, method_by_code,
                       method_code, register_method, unregister_method)
from .run import run_method
from .content import content_rows, content_seeds, order_rows
from .interface import TokenGrid

__all__ = ["BUILTIN", "DEFAULT_METHOD", "DEFAULT_REGISTRY", "ENTRY_POINT_GROUP", "SIGNALS", "Method", "MethodFailure",
           "MethodInputs", "MethodRegistry", "Selection", "Signal", "available_methods", "get_method", "method_by_code",
           "method_code", "register_method", "unregister_method", "run_method", "content_rows", "content_seeds",
           "order_rows", "TokenGrid"]
