"""desap::received_attention on the CPU (float32 and float64 in blocks of heads and queries, half
precision in two fused-attention passes) against the float64 oracle, its fake, and its argument checks."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from desap_ops import received as received_module
from desap_ops.integrations.common import signals
from desap_ops.received import received_attention, received_attention_reference

# (rtol, atol) per input dtype against the float64 oracle on the same (rounded) inputs; the
# outputs are attention weights of order 1 / segment length
TOLERANCES = {
    torch.float64: (1e-4, 1e-6),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (8e-3, 1e-5),
}

LAYOUTS = {
    "one": lambda t: [0, t],
    "equal": lambda t: [0, t // 3, 2 * t // 3, t],
    "ragged": lambda t: [0, 37, t // 2, t // 2 + 1, t],   # frames of unequal size, one of length 1
    "single token": lambda t: list(range(t + 1)),
}

CASES = [   # tokens, heads, head size, layout
    (300, 16, 72, "ragged"),
    (300, 16, 80, "equal"),
    (257, 3, 8, "one"),
    (120, 1, 72, "ragged"),
    (96, 3, 80, "equal"),
    (5, 3, 8, "single token"),
    (1, 1, 8, "one"),
]


def _inputs(tokens, heads, dim, dtype, magnitude=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, dim, generator=gen, dtype=torch.float64) * magnitude
    k = torch.randn(tokens, heads, dim, generator=gen, dtype=torch.float64) * magnitude
    return q.to(dtype), k.to(dtype)


def _oracle(q, k, boundaries, scale):
    return received_attention_reference(q.double(), k.double(), boundaries, scale)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("tokens,heads,dim,layout", CASES)
def test_the_op_equals_the_float64_oracle(tokens, heads, dim, layout, dtype):
    q, k = _inputs(tokens, heads, dim, dtype)
    boundaries, scale = LAYOUTS[layout](tokens), dim**-0.5
    got = received_attention(q, k, boundaries, scale)
    assert got.dtype == torch.float32 and got.shape == (tokens,)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, _oracle(q, k, boundaries, scale), rtol=rtol, atol=atol, check_dtype=False)
    # each segment's queries spread one unit of attention over its keys
    sums = torch.stack([got[a:b].sum() for a, b in zip(boundaries[:-1], boundaries[1:])])
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_bytes", [1, 4 * 60 * 7, 4 * 300 * 50], ids=["a query", "heads of 7 queries",
                                                                          "50 queries of a head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_cpu_blocks_cover_every_head_and_query_once(monkeypatch, block_bytes, dtype):
    """Blocks smaller than a segment: of one query of one head, of a few heads of 7 queries (60-token
    frames), of 50 of a 300-token image's queries; the sum is the oracle's whatever the cut."""
    monkeypatch.setattr(received_module, "CPU_BLOCK_BYTES", block_bytes * dtype.itemsize // 4)
    q, k = _inputs(300, 5, 8, dtype, seed=3)
    for boundaries in ([0, 300], [0, 60, 120, 180, 240, 300], LAYOUTS["ragged"](300)):
        got = received_attention(q, k, boundaries, 8**-0.5)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(got, _oracle(q, k, boundaries, 8**-0.5), rtol=rtol, atol=atol, check_dtype=False)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_large_logits_stay_finite_and_exact(dtype):
    """|q . k| * scale in the hundreds: exp would overflow without the log-sum-exp's max, and the
    bias of the second pass (-lse of the first) must cancel logits of that size."""
    q, k = _inputs(200, 3, 72, dtype, magnitude=30.0, seed=1)
    boundaries, scale = [0, 64, 200], 72**-0.5
    expected = _oracle(q, k, boundaries, scale)
    assert torch.einsum("ihd,jhd->hij", q.double(), k.double()).abs().max() * scale > 300
    got = received_attention(q, k, boundaries, scale)
    assert torch.isfinite(got).all()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, expected.float(), rtol=rtol, atol=atol)


def test_strided_views_as_the_readers_pass_them():
    """The readers hand over queries and keys unbound from a fused qkv (strided views)."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(150, 3, 4, 16, generator=gen)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
    assert not q.is_contiguous()
    boundaries = [0, 50, 150]
    torch.testing.assert_close(received_attention(q, k, boundaries, 0.25),
                               received_attention(q.contiguous(), k.contiguous(), boundaries, 0.25))
    torch.testing.assert_close(received_attention(q, k, boundaries, 0.25),
                               _oracle(q, k, boundaries, 0.25).float(), rtol=1e-4, atol=1e-6)


def test_the_signal_of_both_engines_is_the_op_over_its_segments():
    q, k = _inputs(40, 2, 8, torch.float32, seed=3)
    torch.testing.assert_close(signals.received_attention(q, k, [(0, 15), (15, 40)], 0.35),
                               received_attention(q, k, [0, 15, 40], 0.35), rtol=0, atol=0)
    with pytest.raises(ValueError, match="segments"):
        signals.received_attention(q, k, [(0, 15), (16, 40)], 0.35)


def test_the_fake_gives_the_shape_and_dtype():
    with FakeTensorMode():
        q, k = torch.empty(30, 2, 8, dtype=torch.bfloat16), torch.empty(30, 2, 8, dtype=torch.bfloat16)
        out = torch.ops.desap.received_attention(q, k, [0, 10, 30], 0.5)
    assert out.shape == (30,) and out.dtype == torch.float32


def test_under_torch_compile_it_runs_as_one_op():
    q, k = _inputs(64, 2, 8, torch.float32, seed=4)

    def saliency(q, k):
        return torch.ops.desap.received_attention(q, k, [0, 20, 64], 0.3) * 2

    compiled = torch.compile(saliency, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k), saliency(q, k), rtol=0, atol=0)


def test_opcheck():
    q, k = _inputs(24, 2, 8, torch.float32, seed=5)
    torch.library.opcheck(torch.ops.desap.received_attention.default, (q, k, [0, 9, 24], 0.3),
                          test_utils=("test_schema", "test_faketensor"))


def _good():
    q, k = _inputs(10, 2, 8, torch.float32)
    return dict(queries=q, keys=k, boundaries=[0, 4, 10], scale=0.5)


@pytest.mark.parametrize("change,error,name", [
    (dict(queries=torch.zeros(10, 16)), ValueError, "queries"),
    (dict(keys=torch.zeros(10, 2, 8, dtype=torch.int64)), TypeError, "keys"),
    (dict(keys=torch.zeros(11, 2, 8)), ValueError, "keys"),
    (dict(keys=torch.zeros(10, 2, 8, dtype=torch.float64)), TypeError, "keys"),
    (dict(boundaries=[0, 4, 4, 10]), ValueError, "boundaries"),
    (dict(boundaries=[1, 10]), ValueError, "boundaries"),
    (dict(boundaries=[0, 9]), ValueError, "boundaries"),
    (dict(boundaries=[0]), ValueError, "boundaries"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"),
    (dict(scale=-1.0), ValueError, "scale"),
])
def test_bad_inputs_name_the_argument(change, error, name):
    with pytest.raises(error, match=name):
        received_attention(**{**_good(), **change})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_cuda_kernel_registration_runs_the_triton_launcher_and_equals_the_reference(dtype):
    """The op's CUDA implementation, called directly on CPU tensors under the Triton interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1): the wiring from the op to kernels/received.py's
    launcher, boundaries and scale passed as the contract says, ragged segments."""
    from desap_ops import received

    gen = torch.Generator().manual_seed(3)
    queries, keys = (torch.randn(70, 3, 16, generator=gen).to(dtype) for _ in range(2))
    boundaries, scale = [0, 1, 33, 70], 0.25
    got = received._received_cuda(queries, keys, boundaries, scale)
    expected = received.received_attention_reference(queries.double(), keys.double(), boundaries, scale)
    assert got.dtype == torch.float32 and got.shape == (70,)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-9)
