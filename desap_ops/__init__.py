"""desap-ops: fused, exact DeSAP visual-token pruning (arXiv 2604.11240).

``desap_ops.prune`` is the entry point; ``torch.ops.desap.prune`` the registered operator;
``desap_ops.reference`` the pure-PyTorch oracle. Importing this package neither imports triton nor
queries a device.
"""
from . import ops, reference
from .api import prune
from .reference import PruneResult

__all__ = ["prune", "PruneResult", "reference", "ops"]
__version__ = "0.1.0"
