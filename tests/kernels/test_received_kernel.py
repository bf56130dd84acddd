"""kernels/received.py against a float64 oracle: the attention each token receives in its segment."""
import pytest
import torch

from helpers import DTYPES, triton_devices

DEVICES = triton_devices()

# Both passes accumulate in float32 from exact products of the inputs as given (half pairs exactly,
# float32 ones with ieee products), and the oracle takes the same rounded inputs: the error is
# float32 rounding of logits and sums, the same for every input dtype. It grows with the logits'
# magnitude (exp amplifies their absolute error): at most ~30 here.
RTOL = 2e-5
ATOL = 1e-9  # for the smallest received shares, far below 1 / n

LAYOUTS = [  # (boundaries, H, d): one token; one segment of several tiles; equal segments;
    # ragged frames with a segment of one token and segments across tile ends; exactly one tile
    ([0, 1], 1, 8),
    ([0, 150], 3, 72),
    ([0, 40, 80, 120], 16, 80),
    ([0, 1, 66, 130, 197], 3, 80),
    ([0, 64], 16, 72),
]


@pytest.fixture(scope="module")
def received():
    from desap_ops.kernels import received

    return received


def oracle(queries, keys, boundaries, scale):
    """(T,) float64: per segment, softmax over its keys of each of its queries, mean over queries
    and heads; from the N x N matrix."""
    shares = []
    for start, end in zip(boundaries, boundaries[1:]):
        q, k = queries[start:end].double(), keys[start:end].double()
        logits = torch.einsum("ihd,jhd->hij", q, k) * scale
        shares.append(logits.softmax(dim=-1).mean(dim=(0, 1)))
    return torch.cat(shares)


def _inputs(tokens, heads, width, dtype, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(tokens, heads, width, generator=gen) * spread).to(dtype)
    k = (torch.randn(tokens, heads, width, generator=gen) * spread).to(dtype)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_matches_the_oracle(received, device, dtype, layout):
    boundaries, heads, width = layout
    q, k = _inputs(boundaries[-1], heads, width, dtype, seed=len(boundaries) * 100 + heads + width)
    scale = width ** -0.5
    got = received.received_attention(q.to(device), k.to(device), boundaries, scale)
    assert got.dtype == torch.float32 and got.shape == (boundaries[-1],)
    torch.testing.assert_close(got.cpu().double(), oracle(q, k, boundaries, scale), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_peaked_softmax_keeps_its_max(received, device):
    """Logits in the hundreds: exp without the running max overflows, and a max that is not
    carried across key tiles (the largest logit in the last tile) gives wrong weights."""
    boundaries = [0, 5, 140]
    q, k = _inputs(140, 2, 16, torch.float32, seed=3, spread=4.0)
    k[139] = q[5:140].mean(dim=0) * 3  # the key every query of the long segment prefers, in its last tile
    got = received.received_attention(q.to(device), k.to(device), boundaries, 1.0).cpu()
    expected = oracle(q, k, boundaries, 1.0)
    assert expected.max() > 0.3  # the case is as peaked as it means to be
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_of_fused_and_sharded_heads(received, device):
    """q and k as views: out of a fused (T, 3, H, d) qkv, and one tensor-parallel shard of heads."""
    gen = torch.Generator().manual_seed(11)
    fused = torch.randn(100, 3, 8, 24, generator=gen).to(torch.float16).to(device)
    q, k = fused[:, 0, 2:5], fused[:, 1, 2:5]  # strides (576, 24, 1): heads 2..4 of 8
    boundaries = [0, 33, 100]
    got = received.received_attention(q, k, boundaries, 0.2).cpu()
    torch.testing.assert_close(got.double(), oracle(q.cpu(), k.cpu(), boundaries, 0.2), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens(received, device):
    q = torch.empty(0, 4, 16, device=device)
    assert received.received_attention(q, q, [0], 1.0).shape == (0,)


@pytest.mark.parametrize("boundaries,error", [
    ([0, 10], ValueError),          # does not end at T
    ([1, 20], ValueError),          # does not start at 0
    ([0, 10, 10, 20], ValueError),  # an empty segment
    ([0, 12, 8, 20], ValueError),   # not increasing
    ([0, 10.0, 20], TypeError),     # not ints
])
def test_bad_boundaries(received, boundaries, error):
    q = torch.zeros(20, 2, 8)
    with pytest.raises(error, match="boundaries"):
        received.received_attention(q, q, boundaries, 1.0)


def test_bad_tensors(received):
    q = torch.zeros(20, 2, 8)
    with pytest.raises(TypeError, match="queries"):
        received.received_attention(q.double(), q, [0, 20], 1.0)
    with pytest.raises(ValueError, match="queries and keys"):
        received.received_attention(q, q[:, :1], [0, 20], 1.0)
    with pytest.raises(ValueError, match="keys"):
        received.received_attention(q, torch.zeros(20, 8, 2).transpose(1, 2), [0, 20], 1.0)
    with pytest.raises(ValueError, match="queries"):
        received.received_attention(q[0], q, [0, 20], 1.0)
