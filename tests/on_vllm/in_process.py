"""A DeSAP model built in the test's own process (no engine, no worker): vLLM's loader on a tiny
checkpoint under a one-rank gloo group, and vLLM's own processor and batching for its inputs, as
a model runner gives them to ``embed_multimodal``. For what needs the model's methods on chosen
batches, which an engine's scheduler does not let a test pick."""
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def desap_model(folder: Path, desap: dict, max_model_len: int = 512, **model_settings):
    """(the engine config, the model) of the checkpoint in ``folder`` with ``hf_overrides={"desap":
    desap}`` (and ``ModelConfig`` ``model_settings``), in float32; the process's model-parallel group
    is torn down after."""
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)
    from vllm.model_executor.model_loader import get_model

    from desap_ops.integrations.vllm import register

    register()   # as vLLM's plugin loading does in an engine's process
    config = VllmConfig(model_config=ModelConfig(model=str(folder), hf_overrides={"desap": desap},
                                                 max_model_len=max_model_len, dtype="float32", enforce_eager=True,
                                                 **model_settings))
    empty_cache = torch.accelerator.empty_cache
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp(prefix='desap-gloo-')}")
        initialize_model_parallel(1, 1)
        torch.accelerator.empty_cache = lambda: None   # the loader's, which has no CPU allocator to empty
        try:
            yield config, get_model(vllm_config=config)
        finally:
            torch.accelerator.empty_cache = empty_cache
            destroy_model_parallel()
            destroy_distributed_environment()


def process(processor, prompt: str, data: dict, kwargs: dict | None = None, cache=None):
    """vLLM's ``processor`` on ``prompt`` with ``data`` (its ``multi_modal_data``) and the request's
    ``mm_processor_kwargs``, through ``cache`` (a processor cache, or None): ``apply``'s result."""
    from vllm.multimodal.processing import ProcessorInputs
    from vllm.multimodal.processing.context import TimingContext

    ids = processor.info.get_tokenizer()(prompt)["input_ids"]
    inputs = ProcessorInputs(prompt=ids, mm_data_items=processor.info.parse_mm_data(data),
                             hf_processor_mm_kwargs=kwargs or {}, cache=cache)
    return processor.apply(inputs, TimingContext(enabled=False))


def processed_items(model_config, prompt: str, data: dict, kwargs: dict | None = None) -> dict:
    """:func:`process` without a cache on a new processor: each modality's processed items
    (``MultiModalKwargsItem``), in prompt order."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    return dict(process(MULTIMODAL_REGISTRY.create_processor(model_config), prompt, data, kwargs)["mm_kwargs"])


def batched(modality: str, items: list) -> dict:
    """``items`` of one modality as one ``embed_multimodal`` call's keyword arguments (vLLM's batching)."""
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    ((_, count, kwargs),) = list(group_and_batch_mm_kwargs([(modality, item) for item in items]))
    assert count == len(items)
    return kwargs
