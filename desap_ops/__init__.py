"""desap-ops: fused, exact DeSAP visual-token pruning (arXiv 2604.11240).

``desap_ops.prune`` is the entry point; ``PruneFunction`` the same operator as a
``torch.autograd.Function``; ``torch.ops.desap.prune`` the registered operator;
``desap_ops.reference`` the pure-PyTorch oracle; ``apply_desap``/``remove_desap`` patch transformers
models (loaded on first use, so that importing the operator does not import transformers). The
contract all of them keep is docs/contract.md. Importing this package loads no kernel and queries
no device.
"""
from . import ops, reference
from .api import prune
from .function import PruneFunction
from .reference import PruneResult

__all__ = ["prune", "PruneResult", "PruneFunction", "apply_desap", "remove_desap", "reference", "ops"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("apply_desap", "remove_desap"):
        from . import integrations

        return getattr(integrations, name)
    raise AttributeError(f"module 'desap_ops' has no attribute {name!r}")
