"""lmms-eval's own command line with ``--model vllm`` turns DeSAP, or another pruning method, on
through ``hf_overrides`` in ``--model_args`` (its vLLM model passes the arguments it does not know to
``vllm.LLM``).

lmms-eval runs a task of three local questions (``lmms/desap_local_vqa.yaml``) on the tiny LLaVA
checkpoint three times, at once: with DeSAP, with DivPrune (``"method": "divprune"``) at the same
budget, and with the full model. Each question's target is transformers' greedy answer, with
``apply_desap`` for the first two and with ``apply_desap(method="divprune")`` for the third, so each
run must earn the score that only its own answers give. What vLLM served is recorded in the process
(``lmms/run_lmms_eval.py``): the prompt ids show the pruned prompt, and the workers' DeSAP history
shows apply_desap's kept tokens for the same method.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from transformers import AutoTokenizer

from engines import HERE, engine_environment, transformers_run
from probe import read_ranks

OPTIONS = {"keep": 4, "task_ratio": 0.5}
# a second method at the same budget: DivPrune reads only the tokens' features (no attention, no text)
METHOD_OPTIONS = {**OPTIONS, "method": "divprune"}
MAX_TOKENS = 4   # lmms/desap_local_vqa.yaml asks for the same
TASK = "desap_local_vqa"
# (question, image): each gets a different greedy answer with DeSAP, DivPrune and no pruning on this checkpoint
QUESTIONS = (("read the text on the sign", "square"), ("what is the color of the sky ?", "other"),
             ("how many people are there ?", "other"))
TARGETS = ("desap", "desap", "divprune")   # whose answer each question's target is


def _prompt(question: str, question_first: bool) -> str:
    """The prompt vLLM renders from lmms-eval's message with the checkpoint's template. lmms-eval
    0.7.3's ``--model vllm`` builds its chat messages from the task, image first for this task;
    with ``--force_simple`` its simple vLLM model puts the question first (unless ``image_first=True``)."""
    return f"USER: {question} <image> ASSISTANT:" if question_first else f"USER: <image> {question} ASSISTANT:"


def _model_args(folder: Path, desap: dict | None = None) -> str:
    """lmms-eval's ``--model_args`` for the tiny checkpoint, with ``hf_overrides={"desap": desap}`` when given."""
    args = [f"model={folder}", f"max_new_tokens={MAX_TOKENS}", "dtype=float32",
            "gpu_memory_utilization=0.1", "max_model_len=512", "enforce_eager=True"]
    if desap is not None:
        args.append("hf_overrides=" + json.dumps({"desap": desap}))
    return ",".join(args)


def _lmms_eval(tmp_path: Path, runs: dict[str, tuple[str, ...]]) -> dict[str, list]:
    """Run ``lmms-eval --model vllm --model_args MODEL_ARGS MORE...`` on the local task once per
    ``runs`` entry (name: (model_args, *more)), all at once (each its own process and engine: most
    of a run is starting Python, lmms-eval and vLLM, which overlap), in ``tmp_path``, each one's
    output under ``tmp_path / name``; per run, what vLLM served it, per ``LLM.chat`` call
    (``lmms/run_lmms_eval.py``)."""
    # the engine core in lmms-eval's own process: one process fewer to start per run
    env = {**engine_environment(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    started = {}
    for name, (model_args, *more) in runs.items():
        out = tmp_path / name
        out.mkdir()
        args = ["--model", "vllm", "--model_args", model_args, "--tasks", TASK, "--include_path", str(HERE / "lmms"),
                "--batch_size", str(len(QUESTIONS)), "--log_samples", "--output_path", str(out), *more]
        log = open(out / "lmms_eval.log", "w")   # the whole log, for a failure's root cause
        started[name] = (subprocess.Popen([sys.executable, str(HERE / "lmms" / "run_lmms_eval.py"),
                                           str(out / "served.json"), *args],
                                          cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    served = {}
    for name, (process, log) in started.items():
        try:
            code = process.wait(timeout=600)
        finally:
            log.close()
        assert code == 0, (tmp_path / name / "lmms_eval.log").read_text()[-4000:]
        served[name] = [{**call, "ranks": read_ranks(call["ranks"])}   # the records as PruneRecords again
                        for call in json.loads((tmp_path / name / "served.json").read_text())]
    return served


def _results(folder: Path) -> tuple:
    """lmms-eval's score and logged samples (by doc id) in one run's output folder."""
    (results,) = folder.glob("*/*_results.json")
    (samples,) = folder.glob(f"*/*_samples_{TASK}.jsonl")
    docs = {s["doc_id"]: s for s in map(json.loads, samples.read_text().splitlines())}
    return json.loads(results.read_text())["results"][TASK]["exact_match,none"], docs


def test_lmms_eval_with_hf_overrides_prunes_as_apply_desap_and_scores_its_answers(checkpoints, tmp_path):
    assert importlib.util.find_spec("lmms_eval"), "lmms-eval is not installed: install it as .ci/run does"
    folder = checkpoints["llava"]
    # DeSAP through the simple model (the question first: DeSAP reads it all the same); DivPrune and
    # the full model through the chat model (the image first)
    expected = {name: [transformers_run("llava", folder, _prompt(q, question_first), checkpoints[image], options,
                                        max_tokens=MAX_TOKENS) for q, image in QUESTIONS]
                for name, options, question_first in (("desap", OPTIONS, True), ("divprune", METHOD_OPTIONS, False),
                                                      ("full", None, False))}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    answers = {name: [tokenizer.decode(e["output_ids"], skip_special_tokens=True).strip() for e in runs]
               for name, runs in expected.items()}
    targets = [answers[name][i] for i, name in enumerate(TARGETS)]
    scores = {name: sum(a == t for a, t in zip(answers[name], targets)) / len(targets) for name in answers}
    assert len(set(scores.values())) == len(scores)   # else the scores could not tell the runs apart
    # DivPrune kept other tokens than DeSAP, so the record below tells the methods apart
    kept = {name: sorted(tuple(k) for e in expected[name] for k in e["indices"]) for name in ("desap", "divprune")}
    assert kept["desap"] != kept["divprune"]

    with open(tmp_path / f"{TASK}.jsonl", "w") as data:
        for (question, image), target in zip(QUESTIONS, targets):
            data.write(json.dumps({"image": checkpoints[image], "question": question, "answer": target}) + "\n")
    # one batch of the three questions per run, the three runs at once
    served = _lmms_eval(tmp_path, {"desap": (_model_args(folder, OPTIONS), "--force_simple"),
                                   "divprune": (_model_args(folder, METHOD_OPTIONS),),
                                   "full": (_model_args(folder),)})
    calls = {name: call for name, (call,) in served.items()}
    for name, model_class in (("desap", "DesapLlavaForConditionalGeneration"),
                              ("divprune", "DesapLlavaForConditionalGeneration"),
                              ("full", "LlavaForConditionalGeneration")):
        # lmms-eval may reorder a batch: match each request by its prompt
        got = {tuple(r["prompt_token_ids"]): r["output_token_ids"] for r in calls[name]["requests"]}
        assert got == {tuple(e["prompt_ids"]): e["output_ids"] for e in expected[name]}, name
        (rank,) = calls[name]["ranks"]
        assert rank["class"] == model_class, name
    # as vLLM reported them: a pruned prompt holds keep placeholders where the full one holds all of the image's
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    tokens = expected["full"][0]["prompt_ids"].count(image_token)
    assert tokens > OPTIONS["keep"]
    full_lengths = sorted(len(r["prompt_token_ids"]) for r in calls["full"]["requests"])
    for name, placeholders in (("desap", OPTIONS["keep"]), ("divprune", OPTIONS["keep"]), ("full", tokens)):
        requests = calls[name]["requests"]
        assert [r["prompt_token_ids"].count(image_token) for r in requests] == [placeholders] * len(QUESTIONS), name
        assert sorted(len(r["prompt_token_ids"]) + tokens - placeholders for r in requests) == full_lengths, name
    # each pruned run kept apply_desap's tokens for its own method
    for name in ("desap", "divprune"):
        assert sorted(tuple(r.indices.tolist()) for r in calls[name]["ranks"][0]["history"]) == kept[name], name
    # DeSAP read the question before the image (the template's markers, its default); DivPrune read no text
    assert (sorted(r.text_tokens for r in calls["desap"]["ranks"][0]["history"])
            == sorted(len(tokenizer(q, add_special_tokens=False).input_ids) for q, _ in QUESTIONS))
    assert [r.text_tokens for r in calls["divprune"]["ranks"][0]["history"]] == [0] * len(QUESTIONS)
    assert calls["full"]["ranks"][0]["history"] == []

    for name in expected:
        score, docs = _results(tmp_path / name)
        assert [docs[i]["filtered_resps"] for i in range(len(QUESTIONS))] == answers[name], name
        assert score == scores[name], name
