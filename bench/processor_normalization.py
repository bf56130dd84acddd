"""What vLLM's Qwen2.5-VL processor costs per image, and how many pixel bytes it ships, with the
pixels normalized on the CPU (``mm_device_do_normalize=False``: what DeSAP's Qwen classes forced
before; float pixels, which vLLM's processor casts to the model's dtype: 2 bytes a value in
bfloat16, as the published checkpoints run, 4 in float32) and on the device (vLLM's default, which they now keep: the processor ships
the raw uint8 pixels and the tower normalizes them). CPU only: it times the processor, never a GPU.

The processor is DeSAP's (``hf_overrides={"desap": {"keep": 64}}``) on the tiny Qwen2.5-VL
checkpoint (``testing.checkpoint.save_qwen_checkpoint``) with ``max_pixels`` raised, so each image is
processed at its own size. Rounds interleave the two settings (their order alternating), each
round timing every size once per setting; the medians are over the rounds.

    PYTHONPATH=$PWD:$PWD/tests/on_vllm .venv-vllm/bin/python bench/processor_normalization.py \\
        --rounds 15 --dtype bfloat16 --out bench/results/processor-normalization-qwen2.5-vl-cpu-bf16.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SETTINGS = {"cpu-normalize (before)": False, "device-normalize (after)": True}
PROMPT = "<|vision_start|><|image_pad|><|vision_end|> what is in the picture ?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _load() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _processor(folder: Path, device_normalize: bool, max_pixels: int, dtype: str):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(model=str(folder), hf_overrides={"desap": {"keep": 64}}, max_model_len=512,
                         mm_processor_kwargs={"max_pixels": max_pixels}, mm_device_do_normalize=device_normalize,
                         dtype=dtype)
    assert config.multimodal_config.mm_device_do_normalize is device_normalize
    return MULTIMODAL_REGISTRY.create_processor(config)


def _run(processor, image: Image.Image):
    items = processor.info.parse_mm_data({"image": image})
    start = time.perf_counter()
    out = processor(PROMPT, items)
    seconds = time.perf_counter() - start
    (item,) = out["mm_kwargs"]["image"]
    return seconds, item["pixel_values"].data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 1344])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the model's dtype")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    import transformers
    import vllm

    from desap_ops.benchmarks.skeleton import write_json
    from desap_ops.benchmarks.vllm.processor_cost import ProcessorCostResult, ProcessorCostRow
    from desap_ops.integrations.vllm import register
    from desap_ops.testing.checkpoint import save_qwen_checkpoint
    from desap_ops.testing.tiny_vllm import tiny_vllm_qwen2_5_vl

    register()
    torch.set_num_threads(1)   # one core, as one API-server process handles one request
    folder = save_qwen_checkpoint(tiny_vllm_qwen2_5_vl(0), Path(tempfile.mkdtemp()) / "qwen2_5_vl")
    rng = np.random.default_rng(0)
    images = {size: Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for size in args.sizes}
    max_pixels = max(args.sizes) ** 2
    processors = {name: _processor(folder, flag, max_pixels, args.dtype) for name, flag in SETTINGS.items()}
    load_before = _load()
    for processor in processors.values():   # warm-up: first calls build caches
        for image in images.values():
            _run(processor, image)
    times = {name: {size: [] for size in args.sizes} for name in SETTINGS}
    shipped = {}
    names = list(SETTINGS)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for size, image in images.items():
                seconds, pixels = _run(processors[name], image)
                times[name][size].append(seconds)
                shipped[name, size] = pixels
    load_after = _load()
    results = [ProcessorCostRow(setting=name, mm_device_do_normalize=SETTINGS[name], size=size,
                                median_ms=1e3 * statistics.median(times[name][size]),
                                times_ms=[1e3 * t for t in times[name][size]],
                                pixel_dtype=str(shipped[name, size].dtype).removeprefix("torch."),
                                pixel_shape=list(shipped[name, size].shape), pixel_bytes=shipped[name, size].nbytes)
               for name in SETTINGS for size in args.sizes]
    record = ProcessorCostResult(
        what="vLLM Qwen2.5-VL multimodal processor (DeSAP's, keep 64) per image, tiny checkpoint's processor config "
             "with max_pixels raised to the largest image",
        cpu=_cpu_model(), logical_cpus=os.cpu_count() or 0, torch_threads=torch.get_num_threads(),
        loadavg_before=load_before, loadavg_after=load_after,
        versions={"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        model_dtype=args.dtype, rounds=args.rounds, results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, args.out)
    print(f"{record.cpu}; load {load_before} -> {load_after}")
    print(f"{'setting':26} {'size':>5} {'median ms':>10} {'dtype':>8} {'bytes':>10}")
    for row in results:
        print(f"{row.setting:26} {row.size:>5} {row.median_ms:>10.2f} {row.pixel_dtype:>8} {row.pixel_bytes:>10}")


if __name__ == "__main__":
    main()
