"""``desap bench serve``'s run: every setting on a server of its own, in turn, then the rows
compared and gathered into a :class:`ServeResult` with the engine's settings and the raw records."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..machine import LoadAverage, load_average
from ..skeleton import Progress, flattened, optional
from .checkpoints import checkpoint_folder
from .processes import new_log_folder
from .record import EngineBinding, VllmEnvironment
from .serve_analysis import ServeRow, ServeTarget, compare, target
from .serve_plan import COMMAND, ServePlan
from .serve_server import ServedSetting, run_setting


@dataclass
class ServeEngine:
    """The server's settings, the same for every setting (the first one's binding as logged)."""
    max_model_len: int
    kv_cache_memory_bytes: Optional[int]   # the CPU build's cache; None: vLLM's memory fraction
    enforce_eager: bool
    prefix_caching: bool
    mm_processor_cache_gb: int
    sampling: str
    binding: EngineBinding = flattened()


@dataclass
class ServeResult:
    environment: VllmEnvironment
    command: str
    model: str
    weights: str
    checkpoint: str
    dtype: str
    task_ratio: Union[float, str]
    image_tokens: int
    image_side: int
    input_len: int
    max_tokens: int
    warmups: int
    concurrency: list[int]
    prompts: list[int]
    settings: list[str]          # the rows' settings in order (other methods' after DeSAP's at each budget)
    load_average: LoadAverage
    engine: ServeEngine
    client: list[str]            # the first setting's ``vllm bench serve`` command per level
    rows: list[ServeRow]
    target: Optional[ServeTarget]
    raw: list[ServedSetting]
    logs: str
    methods: Optional[list[str]] = optional()   # the other methods asked for per request (--methods)


def run(plan: ServePlan, progress: Optional[Progress] = None) -> ServeResult:
    """Every setting of ``plan`` in turn, each on its own server."""
    say = progress or (lambda _: None)
    folder = checkpoint_folder(plan.model, say)
    logs = new_log_folder(COMMAND, say)
    started = load_average()
    raws = [run_setting(plan, setting, folder, logs, say) for setting in plan.settings]
    rows = [ServeRow.of(raw, level) for raw in raws for level in raw.levels]
    compare(rows)
    first = raws[0]
    engine = ServeEngine(max_model_len=plan.max_model_len,
                         kv_cache_memory_bytes=plan.kv_cache_bytes if plan.cpu else None,
                         enforce_eager=plan.cpu, prefix_caching=False, mm_processor_cache_gb=0,
                         sampling="greedy, ignore_eos", binding=first.binding)
    return ServeResult(
        environment=VllmEnvironment.here(), command=plan.command, model=plan.model, weights="random",
        checkpoint=str(folder), dtype=plan.dtype, task_ratio=plan.task_ratio, image_tokens=plan.shape.image_tokens,
        image_side=plan.image_side, input_len=plan.input_len, max_tokens=plan.max_tokens, warmups=plan.warmups,
        concurrency=plan.concurrency, prompts=plan.prompts, settings=list(dict.fromkeys(r.setting for r in rows)),
        load_average=LoadAverage(started, load_average()), engine=engine,
        client=[level.command for level in first.levels], rows=rows, target=target(rows, plan.shape.image_tokens),
        raw=raws, logs=str(logs), methods=next((list(s.methods) for s in plan.settings if s.methods), None))
