"""What crosses between ``desap bench serve`` and vLLM's client in its own process
(:mod:`.serve_client`), as JSON: the client's orders (:class:`ClientSpec`) and what it measured at
each concurrency (:class:`LevelRecord`). Imports nothing of vLLM."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..machine import LoadAverage
from ..skeleton import optional


@dataclass
class ClientLevel:
    """What :mod:`.serve_client` runs at one concurrency."""
    concurrency: int
    prompts: int
    seed: int


@dataclass
class ClientSpec:
    """What :mod:`.serve_client` runs: vLLM's benchmark at each level against ``url``."""
    url: str
    folder: str
    input_len: int
    max_tokens: int
    image_side: int
    warmups: int
    result_dir: str
    name: str
    levels: list[ClientLevel]
    methods: list[str] = field(default_factory=list)   # after the engine's own: each asked for per request


@dataclass
class LevelRecord:
    """One concurrency level as the client measured it: vLLM's benchmark result (its own keys, the
    client's KEPT), the server's counters over the level (their Prometheus names) and its peak KV
    usage."""
    concurrency: int
    prompts: int
    seed: int
    command: str                        # the ``vllm bench serve`` command line
    result: dict[str, Optional[float]]
    metrics: dict[str, float]
    peak_kv_usage: Optional[float]
    kv_usage_samples: int
    load_average: LoadAverage
    method: Optional[str] = optional()  # the pruning method the requests asked for; None: the engine's own
