"""desap-ops: fused, exact DeSAP visual-token pruning (arXiv 2604.11240).

``desap_ops.prune`` is the entry point; ``PruneFunction`` the same operator as a
``torch.autograd.Function``; ``torch.ops.desap.prune`` the registered operator;
``desap_ops.reference`` the pure-PyTorch oracle. The contract all of them keep is docs/contract.md.
``register_method`` adds a pruning method beside DeSAP and the built-in baselines
(``desap_ops.methods``), for both engines.
Importing this package loads no kernel and queries no device.

``apply_desap`` and ``remove_desap`` are ``desap_ops.integrations``'s, re-exported here for
convenience and imported on first use (so that importing the operator imports neither the
integrations nor transformers). That lazy import is the one exception to "imports run one way"
(app -> integrations -> operator -> kernels): no other operator module imports the integrations.
"""
from . import ops, received, reference
from .api import prune
from .function import PruneFunction
from .methods import MethodInputs, Selection, available_methods, register_method
from .reference import PruneResult

__all__ = ["prune", "PruneResult", "PruneFunction", "apply_desap", "remove_desap", "reference", "ops",
           "register_method", "available_methods", "MethodInputs", "Selection"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("apply_desap", "remove_desap"):
        from . import integrations   # the one upward import (see the docstring)

        return getattr(integrations, name)
    raise AttributeError(f"module 'desap_ops' has no attribute {name!r}")
