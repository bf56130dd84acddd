"""``desap bench serve``: vLLM's online serving with and without DeSAP, under concurrent load,
measured by vLLM's own client.

For each setting (the full model; DeSAP at each budget, ``hf_overrides={"desap": {"keep": K,
"task_ratio": R}}``; the ideal at each budget, ``{"keep": K, "ideal": true}``: the same tower, the
first K tokens kept, no scoring) this starts ``vllm serve`` on 127.0.0.1 and drives it with ``vllm
bench serve`` (:mod:`.serve_client`, vLLM's own benchmark run in-process so that vLLM is imported
once per setting): its ``random-mm`` dataset, one square random image and
``--input-len`` random words per request, ``--max-tokens`` output tokens with ``ignore_eos``, at
each ``--concurrency`` in turn (``--max-concurrency``, every request sent at once). A few warm-up
requests run first. Prefix caching and the multimodal processor cache are off and every level has
its own images, so no request reuses another's work.

Per (setting, concurrency): request and output-token throughput, TTFT and TPOT (median, p99) from
``vllm bench serve``; prefill tokens, the prompt tokens of every reply's usage (what the server
scheduled: with DeSAP an image brings K placeholders), with the server's counter
``vllm:prompt_tokens_total`` over the level beside it as a check; peak KV-cache usage, the highest ``vllm:kv_cache_usage_perc`` in the server's
``/metrics`` polled every 0.2 s during the level; each against the full model at the same
concurrency, and DeSAP's share of the ideal's request throughput at the same budget.

Other pruning methods (``--methods``, ``desap_ops.methods``) run on DeSAP's server at each budget,
after DeSAP's own levels, asked for per request (``"mm_processor_kwargs": {"desap": {"method": m}}``
in every request's body, vLLM's ``--extra-body``): the same engine, the same levels and images,
each method its own rows ("divprune=64"), compared with the full model and the ideal alike.

This module is the bench's face for :mod:`desap_ops.benchmarks.skeleton` (check, plan, run, table,
figure); each job lives in a module of its own: the plan (:mod:`.serve_plan`), one setting's server
and client (:mod:`.serve_server`, with what crosses to the client in :mod:`.serve_records`), the
rows and their comparisons (:mod:`.serve_analysis`), the run and its result (:mod:`.serve_run`),
and the table and figure (:mod:`.serve_report`).
"""
from __future__ import annotations

from .record import EngineBinding
from .serve_analysis import TARGET_SHARE, ServeRow, ServeTarget, TargetLevel, compare, target
from .serve_plan import COMMAND, ServePlan, check, parse_concurrency, parse_prompts, plan, typed_command
from .serve_records import ClientLevel, ClientSpec, LevelRecord
from .serve_report import figure, table
from .serve_run import ServeEngine, ServeResult, run
from .serve_server import ServedSetting, client_spec, run_setting, serve_command

__all__ = ["EngineBinding", "TARGET_SHARE", "ServeRow", "ServeTarget", "TargetLevel", "compare", "target", "COMMAND",
           "ServePlan", "check", "parse_concurrency", "parse_prompts", "plan", "typed_command", "ClientLevel",
           "ClientSpec", "LevelRecord", "figure", "table", "ServeEngine", "ServeResult", "run", "ServedSetting",
           "client_spec", "run_setting", "serve_command"]
