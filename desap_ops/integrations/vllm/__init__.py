"""DeSAP inside vLLM: a general plugin (entry point group ``vllm.general_plugins``), on when the
model's config carries ``desap`` (``hf_overrides={"desap": {...}}``; docs/vllm.md).

:func:`register` runs in every vLLM process. It registers one DeSAP class per supported
architecture and wraps the model registry's two lookups: a config with ``desap`` resolves to the
DeSAP class of its architecture, or fails at start-up with the list of supported ones, or with
the supported vLLM versions where vLLM's internals differ from what the plugin hooks
(``hooks``), or with the engine setting it cannot run (``engine_checks``); a config without it
resolves exactly as before, to vLLM's own classes.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from .hooks import QWEN3_ARCHITECTURES

# vLLM architecture -> (DeSAP class, start-up check), as "module:attribute" to import lazily
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlavaForConditionalGeneration": ("llava:DesapLlavaForConditionalGeneration", "llava:check"),
    "LlavaNextForConditionalGeneration": ("llava_next:DesapLlavaNextForConditionalGeneration", "llava_next:check"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl:DesapQwen2_5_VLForConditionalGeneration", "qwen2_5_vl:check"),
    **{arch: (f"qwen3_vl:Desap{arch}", "qwen3_vl:check") for arch in QWEN3_ARCHITECTURES},
}
PREFIX = "Desap"
# set while a DeSAP model builds its parts: a part built from the same config (Qwen2.5-VL's language
# model) is vLLM's own class, not a model that DeSAP refuses
_BUILDING_PARTS: ContextVar[bool] = ContextVar("desap_building_parts", default=False)


@contextmanager
def building_parts() -> Iterator[None]:
    token = _BUILDING_PARTS.set(True)
    try:
        yield
    finally:
        _BUILDING_PARTS.reset(token)


def _load(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def desap_architecture(architectures, model_config) -> str | None:
    """The DeSAP architecture a config resolves to; None without ``desap`` (vLLM's own lookup).
    With ``desap``, a vLLM whose hooked internals differ fails here (``hooks.VllmVersionError``)."""
    from .hooks import check_vllm_hooks
    from .options import read_options

    hf_config = getattr(model_config, "hf_config", None)
    options = read_options(hf_config) if hf_config is not None else None
    if options is None:
        return None
    check_vllm_hooks()
    from .pins import report_installed_changes

    report_installed_changes()   # a warning: the files the V2 tests drove differ (pins.py says why not an error)
    names = [architectures] if isinstance(architectures, str) else list(architectures or ())
    found = [name for name in names if name in SUPPORTED]
    if not found:
        raise ValueError(f'hf_overrides["desap"] is set, but DeSAP in vLLM supports {", ".join(SUPPORTED)}; '
                         f"this model is {', '.join(names) or 'of no architecture'}")
    _load(SUPPORTED[found[0]][1])(hf_config, options)
    from .engine_checks import install

    install(found[0])   # the engine settings, checked once vLLM has built the whole config
    return found[0]


def _forget_resolved_classes() -> None:
    """Empty vLLM's cache of resolved model classes. Its key is the model path and architecture,
    not ``hf_overrides``: a path first resolved without ``desap`` would keep vLLM's own class for a
    later config of the same path that asks for DeSAP, in the same process, and silently not prune.
    Looked up without importing: until vLLM has imported the module, the cache is empty anyway."""
    utils = sys.modules.get("vllm.model_executor.model_loader.utils")
    cache = getattr(utils, "_MODEL_ARCH_BY_HASH", None)
    if cache is not None:
        cache.clear()


def _wrap(lookup: Callable) -> Callable:
    def wrapped(architectures, model_config, *args, **kwargs):
        if not _BUILDING_PARTS.get():
            _forget_resolved_classes()
        arch = None if _BUILDING_PARTS.get() else desap_architecture(architectures, model_config)
        if arch is None:
            return lookup(architectures, model_config, *args, **kwargs)
        found, _ = lookup([PREFIX + arch], model_config, *args, **kwargs)
        return found, arch
    wrapped.desap_wraps = lookup
    return wrapped


def register() -> None:
    """vLLM's plugin hook (may run several times per process). Checks only the registry's lookups
    it wraps: without them no ``desap`` config could be caught, so this is the one place to fail;
    the rest is checked when a config asks for DeSAP (:func:`desap_architecture`)."""
    from vllm import ModelRegistry

    from .hooks import REGISTRY_HOOKS, HookGroup, check_vllm_hooks

    check_vllm_hooks([HookGroup("the model registry's lookups, which catch a desap config", REGISTRY_HOOKS)],
                     bindings=())
    for arch, (target, _) in SUPPORTED.items():
        ModelRegistry.register_model(PREFIX + arch, f"{__name__}.{target}")
    for name in ("inspect_model_cls", "resolve_model_cls"):
        lookup = getattr(ModelRegistry, name)
        if not hasattr(lookup, "desap_wraps"):
            setattr(ModelRegistry, name, _wrap(lookup))
