"""Run one vLLM engine on a job and write what it did as JSON (the vLLM tests start each engine in
its own process: vLLM spawns workers, and one engine per process is what it is built for).

    python engine.py JOB.json OUT.json

JOB: {"model": folder, "engine": {LLM keyword arguments}, "requests": [{"prompt": str,
"image": "file.png" or [files]}], "max_tokens": int, "rounds": int}. All requests go in one
``generate`` call (one batch), ``rounds`` times. OUT: per round, per request, the prompt and
output token ids; and per tensor-parallel rank, the model's class name and its DeSAP history.
"""
import json
import os
import sys


def main():
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"   # apply_model sends a function to the workers
    from PIL import Image
    from vllm import LLM, SamplingParams

    from probe import history

    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], **job["engine"])

    def image(entry):
        return [Image.open(f).convert("RGB") for f in entry] if isinstance(entry, list) else Image.open(entry).convert("RGB")

    requests = [{"prompt": r["prompt"], "multi_modal_data": {"image": image(r["image"])}} for r in job["requests"]]
    params = SamplingParams(temperature=0.0, max_tokens=job.get("max_tokens", 8))
    rounds = []
    for _ in range(job.get("rounds", 1)):
        outputs = llm.generate(requests, params, use_tqdm=False)
        rounds.append([{"prompt_token_ids": list(o.prompt_token_ids), "output_token_ids": list(o.outputs[0].token_ids)}
                       for o in outputs])
    ranks = llm.apply_model(history)
    json.dump({"rounds": rounds, "ranks": ranks}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
