"""Engine settings a DeSAP model refuses when vLLM builds its config, in the process that starts
the engine, before any worker: ``ValueError`` naming the setting.

The settings live outside the model's config (the parallel layout, the encoder's sharding), so
they are checked where vLLM checks its own per-architecture settings: an entry of
``vllm.model_executor.models.config.MODELS_CONFIG_MAP``, which ``VllmConfig`` runs once it has
every part. The entry is installed for an architecture when a config with ``desap`` resolves to it;
for a config without ``desap`` it only runs what vLLM had there before.
"""
from __future__ import annotations

import importlib

from .options import read_options


def check_engine(vllm_config) -> None:
    """Refuse what every DeSAP family cannot run, then what its own module's ``check_engine``
    refuses (Qwen2.5-VL: pipeline parallelism and the rest)."""
    from . import SUPPORTED

    model_config = vllm_config.model_config
    multimodal = getattr(model_config, "multimodal_config", None)
    if getattr(multimodal, "mm_encoder_tp_mode", None) == "data":
        # each rank would run the tower on some of the images: the saliency's all-reduce and the
        # operator's inputs would no longer be the same on every rank
        raise ValueError('DeSAP reads its signals from the vision tower sharded by weights across ranks: '
                         'mm_encoder_tp_mode="data" is not supported, use "weights"')
    target = SUPPORTED.get(model_config.architecture)
    if target is not None:
        family = importlib.import_module(f"{__package__}.{target[0].split(':')[0]}")
        if hasattr(family, "check_engine"):
            family.check_engine(vllm_config)


def install(architecture: str) -> None:
    """Run :func:`check_engine` for ``architecture`` when vLLM builds an engine config with ``desap``."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    before = MODELS_CONFIG_MAP.get(architecture)
    if getattr(before, "desap_checks", False):
        return

    class DesapEngineCheck(VerifyAndUpdateConfig):
        desap_checks = True
        desap_wraps = before

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if read_options(vllm_config.model_config.hf_config) is not None:
                check_engine(vllm_config)
            if before is not None:
                before.verify_and_update_config(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            if before is not None:
                before.verify_and_update_model_config(model_config)

    MODELS_CONFIG_MAP[architecture] = DesapEngineCheck
