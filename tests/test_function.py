"""PruneFunction: the torch.autograd.Function over the registered ops."""
import pytest
import torch

from desap_ops import PruneFunction, reference

from helpers import TRITON_DEVICE, tie_free_case


def _apply(case, hidden, backend="auto"):
    return PruneFunction.apply(hidden, case.attn, case.text, case.saliency, case.keep, case.text_mask,
                               case.task_ratio, case.merge, case.metric, case.text_reduce, backend)


@pytest.mark.parametrize("merge", [pytest.param(True, marks=pytest.mark.slow), False])
def test_gradcheck_and_gradgradcheck(merge):
    case = tie_free_case(tokens=14, keep=4, width=5, dtype=torch.float64, merge=merge, with_mask=True)
    hidden = case.hidden.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h: _apply(case, h)[0], (hidden,))
    assert torch.autograd.gradgradcheck(lambda h: _apply(case, h)[0], (hidden,))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_forward_and_gradient_equal_the_reference(backend):
    case = tie_free_case(tokens=18, keep=5, with_mask=True, seed=3)
    device_case = case.to(TRITON_DEVICE if backend == "triton" else "cpu")
    hidden = device_case.hidden.clone().requires_grad_(True)
    tokens, indices, assignment, scores, task_keep = _apply(device_case, hidden, backend)
    expected = reference.prune(*case.args(), **case.options)
    assert torch.equal(indices.cpu(), expected.indices) and torch.equal(assignment.cpu(), expected.assignment)
    torch.testing.assert_close(tokens.cpu(), expected.tokens)
    assert not (indices.requires_grad or assignment.requires_grad or scores.requires_grad or task_keep.requires_grad)
    assert torch.equal(task_keep.cpu(), expected.task_keep)
    grad_out = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
    tokens.backward(grad_out.to(tokens.device))
    ref_hidden = case.hidden.clone().requires_grad_(True)
    reference.prune(ref_hidden, *case.args()[1:], **case.options).tokens.backward(grad_out)
    torch.testing.assert_close(hidden.grad.cpu(), ref_hidden.grad)


@pytest.mark.slow
def test_under_torch_compile_fullgraph_forward_and_backward():
    case = tie_free_case(tokens=24, keep=6, with_mask=True)
    torch._dynamo.reset()

    def loss(hidden):
        tokens, indices, *_ = _apply(case, hidden * 2.0)
        return (tokens ** 2).sum(), indices

    eager_hidden = case.hidden.clone().requires_grad_(True)
    eager_loss, eager_indices = loss(eager_hidden)
    eager_loss.backward()
    compiled_hidden = case.hidden.clone().requires_grad_(True)
    compiled_loss, compiled_indices = torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled_hidden)
    compiled_loss.backward()
    assert torch.equal(compiled_indices, eager_indices)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_hidden.grad, eager_hidden.grad)
