"""The V2 runner modules whose code the plugin's V2 tests drive, pinned per supported vLLM release
by the SHA-256 of the file's bytes as the release's wheel ships it.

The hook table (``hooks``) checks the names, parameters and wiring the plugin relies on; the tests
drive these modules' own code on stand-ins (tests/on_vllm/test_vllm_v2_pruner.py on 0.32,
tests/on_vllm/test_vllm_v2_034.py on 0.34's sources). A release that changes any byte of one of
them was not what those tests drove, so ``release_check`` fails on it until someone reviews the
change and pins the new hash. At start-up (:func:`report_installed_changes`) a supported version
whose files differ is logged as a warning, not refused: the hook table's rules, which do refuse,
still hold or fail on their own, and a byte change alone (a distributor's patch, a local edit, a
rebuilt wheel with another comment) says the tests did not drive this copy, not that it is wrong.

Byte-identical across the supported releases: ``gpu/mm/encoder_runner.py`` and
``gpu/model_states/mm_pruning.py`` (0.32.0, 0.33.0, 0.34.0); ``gpu/mm/rope.py`` in 0.32.0 and
0.33.0 only (0.34.0 stages positions through ``.numpy()``); ``gpu/mm/encoder_cache.py`` in 0.33.0
and 0.34.0 only. ``gpu/model_states/default.py`` and ``gpu/buffer_utils.py`` differ in each.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Optional

from .hooks import SUPPORTED_VLLM, installed_root

log = logging.getLogger(__name__)

_ALL = dict.fromkeys(SUPPORTED_VLLM)
# module: {release: sha256 of the file}; a module a release lacks has no entry for it (0.34 alone has a
# V2 runner of its own on the CPU)
PINNED_SHA256: dict[str, dict[str, str]] = {
    "vllm.v1.worker.gpu.mm.encoder_runner": dict.fromkeys(
        _ALL, "894ffc53e702e9bf9ca06bf21dcd4c7a169a36d7bd3de2387bbe43c972427006"),
    "vllm.v1.worker.gpu.model_states.mm_pruning": dict.fromkeys(
        _ALL, "b150940b12ae76048f050a8eeb54d532bbdc530a18ffbf320ddeeb0cfaa90f93"),
    "vllm.v1.worker.gpu.mm.encoder_cache": {
        "0.32.0": "a27a52c2c52686a574b24910d38f7bd81508fa75d9d757f1b8d6e169575aa385",
        "0.33.0": "191e1f5e33a066b0692ed132774c37a99108477a7ac25f3addc47efe763c1c9a",
        "0.34.0": "191e1f5e33a066b0692ed132774c37a99108477a7ac25f3addc47efe763c1c9a",
    },
    "vllm.v1.worker.gpu.mm.rope": {
        "0.32.0": "0924375bcb367267e783b57dd2ad9de1189d97025ce4313baaa54f2911eaaf1e",
        "0.33.0": "0924375bcb367267e783b57dd2ad9de1189d97025ce4313baaa54f2911eaaf1e",
        "0.34.0": "6e085037a1aab2dde93ac4e5997ee7c74ff8557570f9b90875721127ccd2d544",
    },
    "vllm.v1.worker.gpu.model_states.default": {
        "0.32.0": "f1d34d5c8c03be6e5afec8c2a24480ec259ca7c87392462f4e52d6c4eb775733",
        "0.33.0": "453eb32c5efef9f4064c333c3e5e714aef3adc16645db1f4a311f8a397860f02",
        "0.34.0": "bb56dd4064fbef708ae09117c6b39adc168f70f1adc32e777ad1d9907812f1c9",
    },
    # the rope state's staged writes (StagedWriteTensor, UvaBackedTensor)
    "vllm.v1.worker.gpu.buffer_utils": {
        "0.32.0": "1f387c3557facb1cb48dc1bd52d7e488b5e9bd88eaffe64e808c42feab73a1db",
        "0.33.0": "e8789b87f4185c0805bd8e2a39b50581e882102bc852ab7e6e1963af7115a475",
        "0.34.0": "49d79a7b166c55869c66ca6d832f8121ad160acb7299ce0af4ff61dc05606374",
    },
    "vllm.v1.worker.cpu.encoder_cache": {"0.34.0": "a5ce7f19c24693aa08a0f6ccf825dbdb2afe827cb35f1b5a6ec422f5293890dd"},
    "vllm.v1.worker.cpu.encoder_runner": {"0.34.0": "d6237621b8956ccf5cba4c45bc85b26a8eef45ca2e12fd638273fe41a12383d7"},
    "vllm.v1.worker.cpu.mm_pruning": {"0.34.0": "3bb021c8d2f8748a9f9aa2562a2bb871a2b72a30af9523cd832843405b66d5ec"},
    "vllm.v1.worker.cpu.model_states.default": {
        "0.34.0": "98224cdbcc3777df084d7dbc6dd6c068f07c2c699d760b67e2e24c35c743bbf9"},
    "vllm.v1.worker.cpu.rope": {"0.34.0": "578cb6a27c7ebe106bf0535200cb8d62009acf93797c5c8ca984c9a16f9a1bff"},
}


def module_path(module: str) -> str:
    """A pinned module's file, relative to the folder that holds ``vllm/`` (none is a package)."""
    return module.replace(".", "/") + ".py"


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pin_problems(version: str, read: Callable[[str], Optional[bytes]]) -> list[str]:
    """Each pinned module of vLLM ``version`` whose file (``read``: its bytes by
    :func:`module_path`, None where it is missing) differs from its pin, is missing, or exists
    without a pin for this release; a release with no pins at all is one problem."""
    if version not in SUPPORTED_VLLM:
        return [f"vLLM {version} has no pinned V2 modules: review {', '.join(PINNED_SHA256)} and pin them"]
    found = []
    for module, pins in PINNED_SHA256.items():
        data = read(module_path(module))
        if version not in pins:
            if data is not None:
                found.append(f"{module} exists in vLLM {version} but is not pinned for it: review it and pin "
                             f"sha256 {file_sha256(data)}")
        elif data is None:
            found.append(f"{module} is missing in vLLM {version}, which pins it")
        elif file_sha256(data) != pins[version]:
            found.append(f"{module} is not the file reviewed for vLLM {version} (sha256 {file_sha256(data)}, "
                         f"pinned {pins[version]}): review the change, then pin it")
    return found


def read_under(root: Path) -> Callable[[str], Optional[bytes]]:
    """The bytes of a file under ``root`` by its relative path, None where it is missing."""
    def read(relative: str) -> Optional[bytes]:
        path = root / relative
        return path.read_bytes() if path.is_file() else None
    return read


_reported: set[str] = set()


def report_installed_changes() -> list[str]:
    """Log a warning, once per process, for each pinned module of the installed vLLM that differs
    from its pin, where the installed version is supported (another version is the hook table's to
    judge). Returns what it found."""
    import vllm

    version = getattr(vllm, "__version__", "")
    root = installed_root()
    if version not in SUPPORTED_VLLM or root is None:
        return []
    found = pin_problems(version, read_under(root))
    for problem in found:
        if problem not in _reported:
            _reported.add(problem)
            log.warning("DeSAP: %s. The plugin's V2 tests drove the pinned file; the start-up rules still hold.",
                        problem)
    return found
