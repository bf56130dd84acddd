"""The registered operator: opcheck, torch.compile, autograd, validation, import hygiene."""
import math
import subprocess
import sys

import pytest
import torch

import desap_ops
from desap_ops import reference

from helpers import TRITON_DEVICE, assert_matches_reference, tie_free_case, triton_devices


def _op_cases():
    yield tie_free_case(tokens=20, keep=5, with_mask=True, seed=1)
    yield tie_free_case(tokens=16, keep=16, merge=False, text_reduce="mean", seed=2)
    yield tie_free_case(tokens=12, keep=3, dtype=torch.float16, separate_metric=True, seed=4)


@pytest.mark.parametrize("case", list(_op_cases()), ids=["mask", "keep-all", "fp16-metric"])
def test_opcheck_prune(case):
    hidden = case.hidden.clone().requires_grad_(case.hidden.dtype == torch.float32)
    args = (hidden,) + case.op_args()[1:]
    torch.library.opcheck(torch.ops.desap.prune.default, args)


@pytest.mark.parametrize("device", triton_devices())
def test_opcheck_prune_triton(device):
    case = tie_free_case(tokens=20, keep=5, with_mask=True, seed=1).to(device)
    args = (case.hidden.clone().requires_grad_(True),) + case.op_args()[1:]
    torch.library.opcheck(torch.ops.desap.prune_triton.default, args)


def test_opcheck_prune_backward():
    assignment = torch.tensor([[0, 1, 1, -1, 2, 0], [2, 2, 1, 0, -1, -1]])
    grad = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.desap.prune_backward.default, (grad, assignment))


def test_fake_shapes_follow_the_arguments():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        hidden, attn = torch.empty(3, 50, 8), torch.empty(3, 50, 6)
        text, saliency = torch.empty(3, 4, 6), torch.empty(3, 50)
        tokens, indices, assignment, scores, task_keep = torch.ops.desap.prune(
            hidden, attn, text, None, saliency, None, 7, 0.5, True, "max")
    assert tokens.shape == (3, 7, 8) and indices.shape == (3, 7)
    assert assignment.shape == (3, 50) and scores.shape == (3, 50)
    assert (indices.dtype, assignment.dtype, scores.dtype) == (torch.int64, torch.int64, torch.float32)
    assert task_keep.shape == (3,) and task_keep.dtype == torch.int64


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    case = tie_free_case(tokens=24, keep=6, with_mask=True)
    torch._dynamo.reset()

    def pipeline(hidden, attn, text, mask, saliency):
        result = desap_ops.prune(hidden * 2.0, attn, text, saliency, 6, text_mask=mask)
        return result.tokens.sum(dim=-1), result.indices, result.assignment

    compiled = torch.compile(pipeline, fullgraph=True, backend=compile_backend)
    args = (case.hidden, case.attn, case.text, case.text_mask, case.saliency)
    for got, expected in zip(compiled(*args), pipeline(*args)):
        torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_torch_compile_backward():
    case = tie_free_case(tokens=24, keep=6)
    torch._dynamo.reset()

    def loss(hidden):
        return (desap_ops.prune(hidden, case.attn, case.text, case.saliency, 6).tokens ** 2).sum()

    hidden = case.hidden.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(loss(hidden), hidden)
    (compiled,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(hidden), hidden)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("merge", [pytest.param(True, marks=pytest.mark.slow), False])
def test_gradcheck_float64(merge):
    case = tie_free_case(tokens=14, keep=4, dtype=torch.float64, merge=merge, width=5)
    hidden = case.hidden.clone().requires_grad_(True)

    def tokens(h):
        return desap_ops.prune(h, case.attn, case.text, case.saliency, 4, merge=merge).tokens

    assert torch.autograd.gradcheck(tokens, (hidden,))
    assert torch.autograd.gradgradcheck(tokens, (hidden,))


def test_gradient_reaches_hidden_only():
    case = tie_free_case(tokens=14, keep=4, separate_metric=True)
    tensors = dict(hidden=case.hidden, attn=case.attn, text=case.text, saliency=case.saliency,
                   metric=case.metric)
    leaves = {name: t.clone().requires_grad_(True) for name, t in tensors.items()}
    result = desap_ops.prune(leaves["hidden"], leaves["attn"], leaves["text"], leaves["saliency"], 4,
                             metric=leaves["metric"])
    assert not result.task_scores.requires_grad
    result.tokens.sum().backward()
    assert leaves["hidden"].grad is not None
    for name in ("attn", "text", "saliency", "metric"):
        assert leaves[name].grad is None, name


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_op_gradient_equals_reference_autograd(backend):
    case = tie_free_case(tokens=18, keep=5, with_mask=True).to(TRITON_DEVICE if backend == "triton" else "cpu")
    grad_out = torch.randn(2, 5, case.hidden.shape[-1], device=case.hidden.device)
    grads = []
    for b in (backend, "reference"):
        hidden = case.hidden.clone().requires_grad_(True)
        result = desap_ops.prune(hidden, case.attn, case.text, case.saliency, 5,
                                 text_mask=case.text_mask, backend=b)
        result.tokens.backward(grad_out)
        grads.append(hidden.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_outputs_never_alias_inputs():
    for device, backend in (("cpu", "auto"), ("cpu", "reference"), (TRITON_DEVICE, "triton")):
        case = tie_free_case(tokens=8, keep=8, merge=False).to(device)
        inputs = {t.data_ptr() for t in (case.hidden, case.attn, case.text, case.saliency)}
        result = desap_ops.prune(*case.args(), merge=False, backend=backend)
        assert not inputs & {t.data_ptr() for t in result}


# --- validation -------------------------------------------------------------------------------

def _good():
    return dict(hidden=torch.randn(2, 6, 4), attn=torch.randn(2, 6, 3), text=torch.randn(2, 5, 3),
                saliency=torch.rand(2, 6), keep=3)


BAD_INPUTS = [
    ("hidden", dict(hidden=torch.randn(6, 4)), ValueError, "3 dimensions"),
    ("hidden", dict(hidden=torch.ones(2, 6, 4, dtype=torch.int64)), TypeError, "floating"),
    ("hidden", dict(hidden=[[1.0]]), TypeError, "torch.Tensor"),
    ("attn", dict(attn=torch.randn(2, 7, 3)), ValueError, "visual tokens"),
    ("attn", dict(attn=torch.randn(3, 6, 3)), ValueError, "batch"),
    ("text", dict(text=torch.randn(2, 5, 4)), ValueError, "text-space width"),
    ("text", dict(text=torch.randn(2, 0, 3)), ValueError, "at least one token"),
    ("text", dict(text=torch.randn(2, 5)), ValueError, "3 dimensions"),
    ("saliency", dict(saliency=torch.rand(2, 5)), ValueError, "(B, N)"),
    ("saliency", dict(saliency=torch.ones(2, 6, dtype=torch.int32)), TypeError, "floating"),
    ("text_mask", dict(text_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "(B, L)"),
    ("text_mask", dict(text_mask=torch.ones(2, 5)), TypeError, "bool"),
    ("metric", dict(metric=torch.randn(2, 5, 3)), ValueError, "visual tokens"),
    ("keep", dict(keep=0), ValueError, "[1, 6]"),
    ("keep", dict(keep=7), ValueError, "got 7"),
    ("keep", dict(keep=2.0), TypeError, "integer"),
    ("keep", dict(keep=True), TypeError, "integer"),
    ("task_ratio", dict(task_ratio=1.5), ValueError, "[0, 1]"),
    ("task_ratio", dict(task_ratio=math.nan), ValueError, "[0, 1]"),
    ("task_ratio", dict(task_ratio="half"), TypeError, "real number"),
    ("merge", dict(merge=2), TypeError, "bool"),
    ("text_reduce", dict(text_reduce="sum"), ValueError, "'sum'"),
    ("backend", dict(backend="cuda"), ValueError, "'cuda'"),
]


@pytest.mark.parametrize("name,change,error,needle", BAD_INPUTS,
                         ids=[f"{n}-{i}" for i, (n, *_) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(name, change, error, needle):
    kwargs = {**_good(), **change}
    positional = [kwargs.pop(k) for k in ("hidden", "attn", "text", "saliency", "keep")]
    with pytest.raises(error) as raised:
        desap_ops.prune(*positional, **kwargs)
    assert name in str(raised.value) and needle in str(raised.value)


def test_the_registered_op_validates_too():
    good = _good()
    with pytest.raises(ValueError, match="keep"):
        torch.ops.desap.prune(good["hidden"], good["attn"], good["text"], None, good["saliency"],
                              None, 9, 0.5, True, "max")


def test_tensors_on_different_devices_are_rejected():
    good = _good()
    with pytest.raises(ValueError, match="saliency is on meta"):
        desap_ops.prune(good["hidden"], good["attn"], good["text"], good["saliency"].to("meta"), 3)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    good = _good()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        desap_ops.prune(*[good[k] for k in ("hidden", "attn", "text", "saliency", "keep")], backend="triton")


def test_triton_backend_rejects_float64():
    good = {k: (v.double().to(TRITON_DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    with pytest.raises(TypeError, match="hidden is torch.float64"):
        desap_ops.prune(*[good[k] for k in ("hidden", "attn", "text", "saliency", "keep")], backend="triton")


def test_import_loads_no_kernel_and_queries_no_device():
    # torch.utils.flop_counter (needed to register the op's FLOP formula) imports the triton
    # package itself when it is installed; our kernels and any device stay untouched.
    code = ("import sys, desap_ops, torch; "
            "assert not [m for m in sys.modules if m.startswith('desap_ops.kernels')], 'kernels imported'; "
            "assert 'desap_ops.triton_backend' not in sys.modules, 'triton backend imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'; "
            "assert 'kernels' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_result_is_a_named_tuple_matching_the_reference():
    case = tie_free_case(tokens=10, keep=3)
    result = desap_ops.prune(*case.args())
    assert result._fields == ("tokens", "indices", "assignment", "task_scores", "task_keep")
    assert_matches_reference(result, case)
    assert reference.PruneResult is desap_ops.PruneResult


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
def test_torch_compile_dynamic_shapes_and_symbolic_keep(backend):
    """dynamic=True over two shapes: keep passed in (a SymInt), keep from the shape
    (h.shape[1] // 4), task_ratio passed in (a SymFloat); forward and backward equal eager."""
    torch._dynamo.reset()
    device = TRITON_DEVICE if backend == "triton" else "cpu"

    def given_keep(h, a, t, s, keep, ratio):
        r = desap_ops.prune(h, a, t, s, keep, task_ratio=ratio, backend=backend)
        return (r.tokens ** 2).sum(), r.indices

    def keep_from_shape(h, a, t, s):
        r = desap_ops.prune(h, a, t, s, h.shape[1] // 4, backend=backend)
        return (r.tokens ** 2).sum(), r.indices

    # the default path through inductor, as a serving engine compiles; the others through
    # AOTAutograd only, to spare the suite inductor's cold code generation (the reference's whole
    # graph took 40 s): the dynamic shapes, guards and fakes they check are the same
    compile_backend = "inductor" if backend == "auto" else "aot_eager"
    compiled = {fn: torch.compile(fn, fullgraph=True, dynamic=True, backend=compile_backend)
                for fn in (given_keep, keep_from_shape)}
    for tokens, keep in ((24, 6), (40, 9)):
        case = tie_free_case(tokens=tokens, keep=keep, seed=tokens).to(device)
        for fn, extra in ((given_keep, (keep, 0.5)), (keep_from_shape, ())):
            grads, outputs = [], []
            for run in (fn, compiled[fn]):
                hidden = case.hidden.clone().requires_grad_(True)
                loss, indices = run(hidden, case.attn, case.text, case.saliency, *extra)
                grads.append(torch.autograd.grad(loss, hidden)[0])
                outputs.append(indices)
            assert torch.equal(outputs[0], outputs[1])
            torch.testing.assert_close(grads[1], grads[0])


def test_auto_on_cuda_runs_an_image_larger_than_the_triton_selection_on_the_reference(monkeypatch):
    # the CUDA kernel's dispatch, driven with CPU tensors: the Triton path would run interpreted,
    # the reference path gives the reference's result, with no error for the size
    from desap_ops import ops
    from desap_ops.kernels import selection

    case = tie_free_case(batch=1, tokens=40, keep=8)
    monkeypatch.setattr(selection, "MAX_TOKENS", 32)   # the case's 40 tokens are then too many
    args = (case.hidden, case.attn, case.text, None, case.saliency, None, 8, 0.5, True, "max", None)
    got = ops._prune_cuda(*args)
    expected = reference.prune(case.hidden, case.attn, case.text, case.saliency, 8)
    assert torch.equal(got[1], expected.indices) and torch.equal(got[0], expected.tokens)
    with pytest.raises(ValueError, match="N <= 32"):
        ops._run_triton(*args)
