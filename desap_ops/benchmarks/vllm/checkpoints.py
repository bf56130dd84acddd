"""The checkpoint folders the vLLM benches serve: each model of
:data:`desap_ops.testing.vllm_models.MODELS` written once (random weights) under the user's cache
and reused."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from desap_ops.testing.checkpoint import MARKER
from desap_ops.testing.vllm_models import MODELS, save_checkpoint

from ..skeleton import Progress
from ._cpu_fixes import apply_fixes

def cache_root() -> Path:
    """Where checkpoint folders are kept: $XDG_CACHE_HOME (default ~/.cache)/desap-ops/vllm."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "desap-ops" / "vllm"


def checkpoint_folder(name: str, say: Progress) -> Path:
    """The checkpoint of ``name`` for vLLM, written on first use (random weights) and reused after;
    written in a folder of its own and renamed, so that an interrupted write is never reused."""
    folder = cache_root() / name
    if (folder / MARKER).is_file():
        return folder
    apply_fixes()
    say(f"writing the {name} checkpoint (random weights) to {folder}, once")
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        save_checkpoint(MODELS[name], partial)
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return folder
