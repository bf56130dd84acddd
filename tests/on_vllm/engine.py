"""Run a vLLM engine on jobs and write what it did as JSON (the vLLM tests start each engine in its
own process: vLLM spawns workers, and one engine per process is what it is built for).

    python engine.py JOB.json OUT.json     one job on a fresh engine, then exit
    python engine.py --serve               one engine, many jobs (``engines.run_engine``)

JOB: {"model": folder, "engine": {LLM keyword arguments}, "requests": [{"prompt": str,
"image": "file.png" or [files], "video": {"frames": "file.npy", "metadata": {...}} (either or both),
"mm_processor_kwargs": {...} (optional: the request's own, e.g. {"desap": {"keep": 4}})}],
"max_tokens": int, "rounds": int, "positions": bool, "one_by_one": bool, "refusals": bool}. All requests go in one ``generate`` call (one batch), ``rounds`` times; with
"one_by_one", each request goes alone in a call of its own. OUT: per round, per request, the
prompt and output token ids and the prefix-cache hits; per tensor-parallel rank, the model's class
name and its DeSAP history; with "positions", per round, the rotary positions of each
language-model forward (M-RoPE: 3 rows) on the first rank (with "one_by_one": per round, per
request, the forwards of that request). With "watch": ["module:function", "module:function"], the
first runs in every worker before the rounds and the second's result per rank is "watched".
With "refusals", a ``generate`` call that raises (a request refused, or the engine dead) gives each of
its requests {"refused": the exception's type name, "message": its text, "kinds": the names of its
classes (``__mro__``)} instead, and the job goes on
(the differential fuzzer, ``fuzz.py``, tells a clean refusal from a death).

With ``--serve`` the process reads JSON lines on its standard input: first {"model", "engine"},
which it builds the engine from, answering {"ready": true}; then {"job": JOB.json, "out":
OUT.json} per job (the job's own "model" and "engine" are those of the engine), answering
{"done": true} or {"error": traceback}. Before every job but the first it empties what a job
could leave behind for the next: the prefix cache, the multimodal processor and encoder caches,
the model's DeSAP history and its recorded positions, so each job sees what a fresh engine would.
Its answers go to the standard output it started with; vLLM's logs (its own and its processes')
go to the standard error, with a line "=== job N: JOB.json" before each job's.
"""
import json
import os
import sys
import traceback


def build(model: str, engine: dict):
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"   # apply_model sends a function to the workers
    from vllm import LLM

    return LLM(model=model, **engine)


def run(llm, job: dict) -> dict:
    """What the engine did on ``job`` (the module docstring's OUT)."""
    from PIL import Image
    from vllm import SamplingParams

    from probe import history, positions_seen, watch_positions

    def image(entry):
        return [Image.open(f).convert("RGB") for f in entry] if isinstance(entry, list) else Image.open(entry).convert("RGB")

    def media(request):
        data = {} if request.get("image") is None else {"image": image(request["image"])}
        if request.get("video") is not None:   # frames (T, H, W, 3) with the metadata Qwen2.5-VL needs
            import numpy as np

            data["video"] = (np.load(request["video"]["frames"]), request["video"]["metadata"])
        return data

    requests = [{"prompt": r["prompt"], "multi_modal_data": media(r),
                 **({"mm_processor_kwargs": r["mm_processor_kwargs"]} if "mm_processor_kwargs" in r else {})}
                for r in job["requests"]]
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8))
    if job.get("positions"):
        llm.apply_model(watch_positions)
    if job.get("watch"):   # ["module:function" run in every worker first, "module:function" read at the end]
        llm.apply_model(_named(job["watch"][0]))

    def record(outputs):
        return [{"prompt_token_ids": list(o.prompt_token_ids), "output_token_ids": list(o.outputs[0].token_ids),
                 "num_cached_tokens": o.num_cached_tokens} for o in outputs]

    rounds, positions = [], []
    for _ in range(job.get("rounds", 1)):
        batches = [[request] for request in requests] if job.get("one_by_one") else [requests]
        outputs, seen = [], []
        for batch in batches:
            try:
                outputs += record(llm.generate(batch, params, use_tqdm=False))
            except Exception as error:   # with "refusals": what the caller saw, and the job goes on
                if not job.get("refusals"):
                    raise
                outputs += [{"refused": type(error).__name__, "message": str(error)[-2000:],
                             "kinds": [kind.__name__ for kind in type(error).__mro__]} for _ in batch]
            if job.get("positions"):
                try:
                    seen.append(llm.apply_model(positions_seen)[0])
                except Exception:   # a dead engine answers nothing more (the outputs say why)
                    if not job.get("refusals"):
                        raise
                    seen.append([])
        rounds.append(outputs)
        if job.get("positions"):
            positions.append(seen if job.get("one_by_one") else seen[0])
    try:
        ranks = llm.apply_model(history)
    except Exception:
        if not job.get("refusals"):
            raise
        ranks = []
    watched = llm.apply_model(_named(job["watch"][1])) if job.get("watch") else None
    return {"rounds": rounds, "ranks": ranks, "positions": positions, "watched": watched}


def forget(llm) -> None:
    """Empty what a job leaves in the engine for the next: the prefix cache, the multimodal caches
    (processor, sender and receiver, encoder outputs), the DeSAP history and recorded positions."""
    from probe import forget_job

    assert llm.reset_prefix_cache(), "the prefix cache could not be reset"
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.apply_model(forget_job)


def main():
    job = json.load(open(sys.argv[1]))
    llm = build(job["model"], job["engine"])
    json.dump(run(llm, job), open(sys.argv[2], "w"))


def serve():
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # everything else, vLLM's logs and its processes', to the standard error
    llm = None
    count = 0
    while line := sys.stdin.readline():
        message = json.loads(line)
        count += 1
        try:
            if llm is None:
                llm = build(message["model"], message["engine"])
                reply = {"ready": True}
            else:
                print(f"=== job {count - 1}: {message['job']}", file=sys.stderr, flush=True)
                if count > 2:
                    forget(llm)
                json.dump(run(llm, json.load(open(message["job"]))), open(message["out"], "w"))
                reply = {"done": True}
        except Exception:   # the caller stops this engine: a failed one is not reused
            traceback.print_exc()
            reply = {"error": traceback.format_exc()}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()
        if "error" in reply:
            break


def _named(target):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
