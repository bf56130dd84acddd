"""What a vLLM engine of the benches needs, from the model's config alone (nothing built but on
meta, no vLLM): its image tokens, the positions a request takes, a KV cache for the busiest
moment, and the memory of it all against what the machine has free."""
from __future__ import annotations

import math
from dataclasses import dataclass

from desap_ops.testing.vllm_models import MODELS, image_tokens, weight_bytes

from ..arguments import UsageError
from ..machine import GIB, check_memory
from ._cpu_fixes import apply_fixes

PROMPT_MARGIN = 64    # room for the prompt's words beside the image tokens in max_model_len
CPU_BLOCK = 128       # vLLM's KV-cache block on its CPU backend, in tokens


@dataclass(frozen=True)
class ModelShape:
    image_tokens: int         # placeholder tokens per image without DeSAP
    max_positions: int        # the language model's max_position_embeddings
    kv_bytes_per_token: int   # K and V over all layers at 2 bytes (an upper bound for the cache size)
    weight_bytes: int         # at 2 bytes per parameter


def model_shape(name: str) -> ModelShape:
    """Token counts and sizes of ``name`` from its config."""
    apply_fixes()   # the parent imports transformers' vision classes too
    model = MODELS[name]
    config = model.config()
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return ModelShape(image_tokens=image_tokens(model, config), max_positions=text.max_position_embeddings,
                      kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * 2,
                      weight_bytes=weight_bytes(model))


def max_model_len(shape: ModelShape, model: str, prompt_tokens: int, max_tokens: int) -> int:
    """Positions an engine needs for one image, ``prompt_tokens`` of text and ``max_tokens`` out;
    UsageError where the model holds fewer."""
    needed = shape.image_tokens + prompt_tokens + max_tokens
    if needed > shape.max_positions:
        raise UsageError(f"--max-tokens {max_tokens} does not fit: {model} holds {shape.max_positions} positions "
                         f"and an image takes {shape.image_tokens}")
    return needed


def kv_cache_bytes(shape: ModelShape, requests: int, max_len: int) -> int:
    """A KV cache that holds ``requests`` requests of ``max_len`` tokens at once (none is preempted),
    at vLLM's CPU block size rounded up per request; at least 64 MiB."""
    per_request = math.ceil(max_len / CPU_BLOCK + 1) * CPU_BLOCK
    return max(64 * 2**20, requests * per_request * shape.kv_bytes_per_token)


def check_engine_memory(command: str, model: str, shape: ModelShape, cache_bytes: int, requests: int) -> None:
    """Refuse a run whose engine cannot fit: weights (twice while loading), the KV cache and 2 GiB
    for vLLM's processes, against the memory available."""
    check_memory(f"{command} on {model}", 2 * shape.weight_bytes + cache_bytes + 2 * GIB, "cpu",
                 f"weights, a KV cache for {requests} requests, vLLM's processes", "use --model tiny or fewer requests")
