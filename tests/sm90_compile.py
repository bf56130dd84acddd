"""Compile every kernel configuration the launchers produce for a Hopper GPU (sm_90), no GPU needed.

The interpreter runs the kernel source as Python, so it cannot catch what only the compiler sees
(non-constexpr globals, type errors in lowering, shared memory over the chip's limit). This script
drives the real launchers with meta tensors on the shapes we ship for, captures each launch, and
compiles it with ``triton.compile`` for sm_90: ptx and cubin, through the same ptxas that triton
uses on the GPU. Run it without TRITON_INTERPRET. Prints one line per compiled configuration
(registers, stack frame, shared memory) and exits non-zero on any failure.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from desap_ops import triton_backend  # noqa: E402
from desap_ops.kernels import merge, received, selection, similarity  # noqa: E402

HOPPER_SHARED_LIMIT = 227 * 1024
MAX_STACK_BYTES = 64  # a larger stack frame means registers spilled to local memory: retune the tiles
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
           torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8"}

captured: dict = {}


def _capture(kernel, grid, args, constexprs, num_warps):
    runtime = iter(args)
    signature = {}
    constexprs = dict(constexprs)
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = next(runtime)
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif int(value) == 1 and name not in getattr(kernel, "do_not_specialize", ()):
            # the JIT turns an integer argument equal to 1 into a constant: compile that variant too
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i64" if abs(int(value)) >= 2**31 else "i32"
    key = (kernel.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps)
    captured[key] = (kernel, signature, dict(constexprs), num_warps)


for module in (similarity, selection, merge, received):
    module.launch = _capture

SHAPES = [  # (B, N, K, D, C, L): LLaVA-1.5, LLaVA-NeXT, video, long prompt, tiny, largest N
    (1, 576, 64, 1024, 4096, 64),
    (1, 2880, 320, 1024, 4096, 64),
    (1, 2048, 256, 1024, 4096, 64),
    (1, 576, 64, 1024, 4096, 1024),
    (1, 5, 1, 8, 8, 1),      # keep = 1 and L = 1: the JIT makes both compile-time constants
    (1, 1, 1, 1, 1, 1),      # every size 1
    (1, selection.MAX_TOKENS, 1024, 1024, 8192, 2048),   # the largest N the kernels take
]


RECEIVED_SHAPES = [  # (boundaries, H, d): Qwen2.5-VL (16 x 80) and Qwen3-VL (16 x 72) towers, one
    # image, ragged frames, and one head per tensor-parallel rank (H = 1: a compile-time constant)
    ([0, 1024], 16, 80),
    ([0, 4096], 16, 72),
    ([0, 1, 300, 7356], 16, 72),
    ([0, 7056], 1, 80),
]


def _drive_received() -> None:
    for boundaries, heads, width in RECEIVED_SHAPES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            fused = torch.empty(boundaries[-1], 3, heads, width, dtype=dtype, device="meta")  # q, k, v
            received.received_attention(fused[:, 0], fused[:, 1], boundaries, width ** -0.5)


def _drive() -> None:
    _drive_received()
    meta = dict(device="meta")
    for batch, tokens, keep, width, text_width, n_text in SHAPES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for merge_tokens in (True, False):
                for with_mask in (True, False):
                    hidden = torch.empty(batch, tokens, width, dtype=dtype, **meta)
                    attn = torch.empty(batch, tokens, text_width, dtype=dtype, **meta)
                    text = torch.empty(batch, n_text, text_width, dtype=dtype, **meta)
                    mask = torch.empty(batch, n_text, dtype=torch.bool, **meta) if with_mask else None
                    saliency = torch.empty(batch, tokens, dtype=dtype, **meta)
                    for reduce, ratio in (("max", 0.5), ("mean", 0.5), ("max", "auto")):
                        triton_backend.prune(hidden, attn, text, mask, saliency, None, keep, ratio,
                                             merge_tokens, reduce)
            grad = torch.empty(batch, keep, width, dtype=dtype, **meta)
            triton_backend.prune_backward(grad, torch.empty(batch, tokens, dtype=torch.int64, **meta))


def _resources(cubin: bytes) -> tuple[str, int]:
    """('regs R stack S', S) from the cubin's resource usage, via the cuobjdump triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "resources n/a", 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    stack_bytes = int(stack.group(1)) if stack else 0
    return f"regs {regs.group(1) if regs else '?'} stack {stack_bytes}", stack_bytes


def _compile_one(index: int) -> tuple[str, bool]:
    """(report line, failed) for the index-th captured configuration (run in a forked worker)."""
    (name, _, constexprs, _), (kernel, signature, consts, warps) = CONFIGURATIONS[index]
    label = f"{name} warps={warps} " + " ".join(f"{k}={v}" for k, v in constexprs)
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    except Exception as err:  # report every failure, not only the first
        return f"FAIL {label}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}", True
    shared = compiled.metadata.shared
    resources, stack_bytes = _resources(compiled.asm["cubin"])
    status = "ok"
    if shared > HOPPER_SHARED_LIMIT:
        status = "FAIL(shared memory)"
    elif stack_bytes > MAX_STACK_BYTES:
        status = "FAIL(spills)"
    return f"{status} {label} | shared {shared} B, {resources}", status != "ok"


CONFIGURATIONS: list = []


def main() -> int:
    _drive()
    CONFIGURATIONS.extend(sorted(captured.items(), key=str))
    start = time.time()
    # each compile is one process's work; forked workers inherit the captured kernels
    workers = int(os.environ.get("SM90_COMPILE_WORKERS", os.cpu_count() or 1))
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        results = pool.map(_compile_one, range(len(CONFIGURATIONS)), chunksize=1)
    for line, _ in results:
        print(line)
    failures = sum(failed for _, failed in results)
    print(f"triton {triton.__version__}: {len(CONFIGURATIONS)} configurations, {failures} failed, "
          f"{time.time() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
