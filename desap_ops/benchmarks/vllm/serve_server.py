"""One setting of ``desap bench serve``: ``vllm serve`` started on 127.0.0.1 with the setting's
``hf_overrides``, vLLM's client (:mod:`.serve_client`, in a process of its own) run against it at
every concurrency level, the server stopped, and what both recorded (:class:`ServedSetting`)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..machine import DTYPES, LoadAverage, dtype_name, load_average
from ..skeleton import Progress, from_json, to_json
from ._cpu_fixes import engine_environment
from .processes import ProcessFailed, free_port, is_healthy, log_tail, run_logged
from .record import EngineBinding
from .serve_plan import ServePlan
from .serve_records import ClientLevel, ClientSpec, LevelRecord
from .settings import Setting

CLIENT = "desap_ops.benchmarks.vllm.serve_client"   # started by name: vLLM is imported there, never here


@dataclass
class ServedSetting:
    """One setting: its server and what the client measured against it."""
    setting: str
    keep: Optional[int]
    ideal: bool
    hf_overrides: Optional[dict]
    server_start_s: float
    server_command: list[str]
    server_log: str
    binding: EngineBinding
    load_average: LoadAverage
    levels: list[LevelRecord]


def serve_command(plan: ServePlan, setting: Setting, folder: Path, port: int) -> list[str]:
    """``vllm serve`` for one setting on 127.0.0.1:``port``."""
    command = [str(Path(sys.executable).parent / "vllm"), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype_name(DTYPES[plan.dtype]), "--max-model-len",
               str(plan.max_model_len), "--seed", "0", "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0",
               "--limit-mm-per-prompt", json.dumps({"image": 1}), "--max-num-seqs", str(max(plan.concurrency)),
               "--disable-uvicorn-access-log"]
    if plan.cpu:   # no CUDA graphs to capture; a cache for the busiest level (a CPU has no memory fraction)
        command += ["--enforce-eager", "--kv-cache-memory-bytes", str(plan.kv_cache_bytes)]
    if setting.methods:   # vLLM refuses a request's mm_processor_kwargs (400) unless the server trusts them
        command.append("--trust-request-mm-kwargs")
    overrides = setting.hf_overrides(plan.task_ratio)
    return command + (["--hf-overrides", json.dumps(overrides)] if overrides else [])


def client_spec(plan: ServePlan, setting: Setting, folder: Path, url: str, logs: Path, name: str) -> ClientSpec:
    return ClientSpec(url=url, folder=str(folder), input_len=plan.input_len, max_tokens=plan.max_tokens,
                      image_side=plan.image_side, warmups=plan.warmups, result_dir=str(logs), name=name,
                      levels=[ClientLevel(c, n, i + 1) for i, (c, n) in enumerate(zip(plan.concurrency, plan.prompts))],
                      methods=list(setting.methods))


def run_setting(plan: ServePlan, setting: Setting, folder: Path, logs: Path, say: Progress,
                start_timeout: float = 1800) -> ServedSetting:
    """Serve ``setting``, run the client against it, stop the server."""
    name = setting.name.replace("=", "")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = logs / f"{name}.server.log"
    before = load_average()
    say(f"{setting.name}: starting vllm serve")
    command = serve_command(plan, setting, folder, port)
    start = time.perf_counter()
    with open(server_log, "w") as log:
        server = subprocess.Popen(command, env=engine_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        while not is_healthy(url):
            if server.poll() is not None or time.perf_counter() - start > start_timeout:
                raise ProcessFailed(f"vllm serve ({setting.name})", server.poll(), server_log, log_tail(server_log))
            time.sleep(2)
        start_s = time.perf_counter() - start
        spec_path, result_path = logs / f"{name}.client.json", logs / f"{name}.levels.json"
        spec_path.write_text(json.dumps(to_json(client_spec(plan, setting, folder, url, logs, name))))
        run_logged([sys.executable, "-m", CLIENT, str(spec_path), str(result_path)], logs / f"{name}.client.log",
                   setting.name, say)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return ServedSetting(setting=setting.name, keep=setting.keep, ideal=setting.ideal,
                         hf_overrides=setting.hf_overrides(plan.task_ratio), server_start_s=start_s,
                         server_command=command, server_log=str(server_log),
                         binding=EngineBinding.from_log(server_log.read_text(errors="replace")),
                         load_average=LoadAverage(before, load_average()),
                         levels=from_json(list[LevelRecord], json.loads(result_path.read_text())))
