"""Two pruning methods, registered through the ``desap_ops.methods`` entry points (pyproject.toml).

``largest-norm`` keeps the K tokens of largest feature norm: a method in a dozen lines, reading no
signal but the features. ``broken-order`` gives its indices in descending order, a wrong selection:
the engines must refuse it by name (transformers raises, vLLM logs it and stays up)."""
import torch

from desap_ops.methods import Method, MethodInputs


def largest_norm(inputs: MethodInputs) -> torch.Tensor:
    norms = inputs.hidden.float().norm(dim=-1)                      # (B, N)
    return norms.topk(inputs.keep, dim=-1).indices.sort(dim=-1).values


def broken_order(inputs: MethodInputs) -> torch.Tensor:
    return largest_norm(inputs).flip(-1)


LARGEST_NORM = Method("largest-norm", largest_norm, reads=frozenset())
BROKEN_ORDER = Method("broken-order", broken_order, reads=frozenset())
