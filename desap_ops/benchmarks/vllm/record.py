"""What the vLLM benches record of where they ran: the machine and the versions, the engine's OpenMP
binding as vLLM logs it, and the line the tables and plots print of both."""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from typing import Optional

from ..machine import cpu_name, utc_now, version
from ._cpu_fixes import engine_environment, vllm_distribution


@dataclass
class VllmEnvironment:
    """The machine (CPU model, count, affinity, torch's threads and the niceness here) and the
    versions that serve: vllm (the CPU build or not), torch, transformers, python."""
    date: str
    cpu: str
    cpu_count: Optional[int]
    cpus_allowed: Optional[int]
    torch_threads: int
    niceness: int
    torch: str
    python: str
    vllm: Optional[str]
    transformers: Optional[str]

    @classmethod
    def here(cls) -> "VllmEnvironment":
        import torch

        return cls(date=utc_now(), cpu=cpu_name(), cpu_count=os.cpu_count(),
                   cpus_allowed=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                   torch_threads=torch.get_num_threads(), niceness=os.nice(0), torch=torch.__version__,
                   python=platform.python_version(), vllm=version(vllm_distribution() or "vllm"),
                   transformers=version("transformers"))


@dataclass
class EngineBinding:
    """The engine's OpenMP binding as vLLM's CPU worker logs it at start-up (None where not found)."""
    engine_cores: Optional[list[int]]
    reserved_cpus: Optional[list[int]]
    omp_threads: Optional[int]
    VLLM_CPU_OMP_THREADS_BIND: str
    VLLM_TARGET_DEVICE: Optional[str]

    @classmethod
    def from_log(cls, log: str) -> "EngineBinding":
        cores = re.search(r"local_rank=\d+, core ids=\[([\d, ]*)\]", log)
        reserved = re.search(r"reserved_cpus=\[([\d, ]*)\]", log)
        parse = lambda m: [int(v) for v in m.group(1).replace(" ", "").split(",") if v] if m else None  # noqa: E731
        return cls(engine_cores=parse(cores), reserved_cpus=parse(reserved),
                   omp_threads=len(parse(cores)) if cores else None,
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (unset)"),
                   VLLM_TARGET_DEVICE=engine_environment().get("VLLM_TARGET_DEVICE"))


def machine_title(environment: VllmEnvironment, binding: EngineBinding) -> str:
    """The tables' and plots' line on the machine: vLLM, the CPU, its count, the engine's threads."""
    threads = binding.omp_threads
    return (f"vLLM {environment.vllm} on {environment.cpu} ({environment.cpu_count} CPUs), engine on "
            f"{threads or '?'} thread{'s' * (threads != 1)}")
