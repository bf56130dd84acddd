"""Helpers of the vLLM tests: each engine runs in its own process (``engine.py --serve``), kept
alive and shared by the jobs of the same model, settings and environment, and transformers with
``apply_desap`` runs the same checkpoint here."""
import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from probe import read_ranks

from desap_ops.methods import BUILTIN
from desap_ops.testing.checkpoint import save_llava_checkpoint, save_qwen_checkpoint
from desap_ops.testing.tiny_vllm import (tiny_vllm_llava, tiny_vllm_qwen2_5_vl, tiny_vllm_qwen3_5,
                                        tiny_vllm_qwen3_vl)

HERE = Path(__file__).parent
ENGINE = dict(gpu_memory_utilization=0.1, max_model_len=512, dtype="float32", enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 2})
# prompts in the checkpoint tokenizer's words; the text after the image differs between them
PROMPTS = ("USER: <image> what is the color of the sky ? ASSISTANT:",
           "USER: <image> read the text on the sign ASSISTANT:",
           "USER: <image> how many people are there ? ASSISTANT:")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# one engine for the unchunked Qwen2.5-VL jobs at keep 6 (test_vllm_qwen_sweep, test_vllm_qwen_video,
# test_vllm_small_images): up to 3 images and a video in a prompt
QWEN_KEEP_6 = {"hf_overrides": {"desap": {"keep": 6}}, "limit_mm_per_prompt": {"image": 3, "video": 1}}
QWEN_PROMPTS = tuple(p.replace("<image>", QWEN_IMAGE) for p in PROMPTS)
# every built-in pruning method and the test plugin's (tests/method_plugin, which .ci/run installs in
# this environment: its entry point is all that registers it, here and in every engine process).
# The sweeps spread them over their requests (per request: ``with_method``), so each family runs
# each method on its paths on engines that start anyway.
METHODS = (*(method.name for method in BUILTIN), "largest-norm")
# the transformers model each checkpoint was saved from
BUILDERS = {"llava": tiny_vllm_llava, "llava_next": lambda seed: tiny_vllm_llava(seed, next_layout=True),
            "qwen2_5_vl": tiny_vllm_qwen2_5_vl, "qwen3_vl": tiny_vllm_qwen3_vl,
            "qwen3_vl_moe": lambda seed: tiny_vllm_qwen3_vl(seed, moe=True),
            "qwen3_vl_64": lambda seed: tiny_vllm_qwen3_vl(seed, positions=64),   # a small rotary cache
            # vLLM's CPU build runs Qwen3.5's linear attention in bfloat16 only: transformers runs it so too
            "qwen3_5": lambda seed: tiny_vllm_qwen3_5(seed).to(torch.bfloat16),
            "qwen3_5_moe": lambda seed: tiny_vllm_qwen3_5(seed, moe=True).to(torch.bfloat16)}


# the session's environment, as it was before any test imported vLLM here (which sets variables of its own)
SESSION = dict(os.environ)


def engine_environment() -> dict:
    """The session's environment for an engine: sitecustomize.py on the path (torchvision)."""
    env = dict(SESSION)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


class EngineKey(NamedTuple):
    """What makes two engines the same: the model folder, the ``LLM`` settings and the environment
    (JSON, keys sorted)."""
    model: str
    settings_json: str
    env_json: str

    @property
    def settings(self) -> dict:
        return json.loads(self.settings_json)

    @property
    def env(self) -> dict:
        return json.loads(self.env_json)


def engine_key(model: Path, engine: dict, tp: int = 1, env: dict | None = None) -> EngineKey:
    """The engine :func:`run_engine` runs a job on: ``ENGINE`` with ``engine`` over it, ``tp`` ranks,
    ``env`` over the session's environment."""
    settings = {**ENGINE, **engine, "tensor_parallel_size": tp}
    if tp == 1:
        settings.setdefault("distributed_executor_backend", "uni")
    env = {**engine_environment(), **(env or {})}
    if tp > 1:   # without a core per worker the CPU build fails its NUMA-binding check
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(tp))
    return EngineKey(str(model), json.dumps(settings, sort_keys=True), json.dumps(env, sort_keys=True))


JOB_TIMEOUT = 600   # seconds for an engine to start, and then for each job
AHEAD_NICE = 10     # an engine started ahead of its job yields the CPU to the test running now


class _Engine:
    """One ``engine.py --serve`` process (its own session and process group: stopping it stops
    vLLM's processes too), its log in a file. ``ahead``: started at a lower priority (``AHEAD_NICE``),
    restored for its first job where this process may (a raised niceness only root may lower)."""

    def __init__(self, key: EngineKey, log: Path, ahead: bool = False):
        self.key, self.log, self.ready, self.jobs = key, log, False, 0
        with open(log, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, str(HERE / "engine.py"), "--serve"], env=key.env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                            start_new_session=True)
        self.niced = ahead and self._nice(AHEAD_NICE)
        self._send({"model": key.model, "engine": key.settings})

    def _nice(self, value: int) -> bool:
        """Set the niceness of the engine's processes (its group: vLLM's processes are in it)."""
        try:
            os.setpriority(os.PRIO_PGRP, self.process.pid, value)
            return True
        except OSError:   # gone, or not allowed
            return False

    def _send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _answer(self, what: str) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], JOB_TIMEOUT)
        line = self.process.stdout.readline() if ready else None
        if not line:
            self.stop()
            why = "ended" if ready else f"gave no answer in {JOB_TIMEOUT} s"
            raise AssertionError(f"the engine {why} ({what}):\n" + self.log.read_text()[-4000:])
        return json.loads(line)

    def run(self, job: Path, out: Path) -> dict:
        if self.niced:
            self.niced = not self._nice(0)
        if not self.ready:
            answer = self._answer("starting")
            assert answer.get("ready"), answer.get("error", answer)
            self.ready = True
        self.jobs += 1
        self._send({"job": str(job), "out": str(out)})
        answer = self._answer(f"job {self.jobs}")
        assert answer.get("done"), f"{answer.get('error', answer)}\n{self.log.read_text()[-4000:]}"
        return json.load(open(out))

    def stop(self) -> None:
        """End the job stream: the process stops its engine and exits (:meth:`wait` reaps it)."""
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:   # it had ended
                pass

    def wait(self, timeout: float = 60) -> None:
        self.stop()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process.stdout.close()


class EnginePool:
    """The live engines, at most ``DESAP_VLLM_ENGINES`` (3) at once (each holds the model and
    ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache), by :class:`EngineKey`. :meth:`plan` names the
    engines the session's jobs will want, in order: the pool starts the next ones while the tests
    before them run, and stops an engine once no job ahead wants it."""

    def __init__(self):
        self.size = int(os.environ.get("DESAP_VLLM_ENGINES", "3"))
        self.live: OrderedDict[EngineKey, _Engine] = OrderedDict()   # least recently used first
        self.ahead: list[EngineKey] = []   # the planned jobs' engines, in order
        self.stopped: list[_Engine] = []   # stopping: reaped at the end
        self.started = 0
        self.folder = None

    def _log(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="vllm-engines-"))
        self.started += 1
        return self.folder / f"engine-{self.started}.log"

    def plan(self, keys: list) -> None:
        self.ahead = list(keys)
        self._fill()

    def run(self, key: EngineKey, job: Path, out: Path, log: Path, fresh: bool = False) -> dict:
        if fresh:
            engine = _Engine(key, self._log())
            try:
                return engine.run(job, out)
            finally:
                log.write_text(engine.log.read_text())
                engine.wait()
        if key in self.ahead:   # the jobs planned before this one will not come (skipped, failed, deselected)
            del self.ahead[:self.ahead.index(key) + 1]
        engine = self.live.get(key)
        if engine is None:
            self._make_room()
            engine = self.live[key] = _Engine(key, self._log())
        self.live.move_to_end(key)
        try:
            return engine.run(job, out)
        except BaseException:
            self._stop(key)
            raise
        finally:
            log.write_text(engine.log.read_text())   # the engine's whole log so far: its start, every job
            self._fill()

    def _stop(self, key: EngineKey) -> None:
        engine = self.live.pop(key)
        engine.stop()
        self.stopped.append(engine)

    def _make_room(self) -> None:
        """Stop engines until one more fits: first those no job ahead wants (least recently used
        first), then the one wanted last."""
        while len(self.live) >= self.size:
            unwanted = [key for key in self.live if key not in self.ahead]
            self._stop(unwanted[0] if unwanted else max(self.live, key=self.ahead.index))

    def _fill(self) -> None:
        """Start the next planned engines that fit."""
        for key in [k for k in self.live if k not in self.ahead]:   # used, and wanted by no job ahead
            self._stop(key)
        for key in dict.fromkeys(self.ahead):
            if key not in self.live:
                if len(self.live) >= self.size:
                    break
                self.live[key] = _Engine(key, self._log(), ahead=key != self.ahead[0])

    def shutdown(self) -> None:
        if self.ahead:
            warnings.warn(f"{len(self.ahead)} planned vLLM job(s) never ran")
        for key in list(self.live):
            self._stop(key)
        for engine in self.stopped:
            engine.wait()
        self.stopped, self.ahead = [], []


POOL = EnginePool()
atexit.register(POOL.shutdown)


def run_engine(tmp_path: Path, model: Path, engine: dict, requests: list, max_tokens: int = 8, rounds: int = 1,
               tp: int = 1, positions: bool = False, one_by_one: bool = False, fresh: bool = False,
               watch: tuple[str, str] | None = None, env: dict | None = None, refusals: bool = False) -> dict:
    """Run an engine on ``requests`` ([(prompt, image file(s))], or [(prompt, {"image": file(s),
    "video": video})] with a video of :func:`save_video`); its JSON (``engine.py`` says what it
    holds). The engine is the live one of the same model, settings and environment (started ahead
    by :func:`plan`, or by a job before), emptied of what earlier jobs left (``engine.py --serve``):
    the job sees what a fresh engine would. ``fresh``: an engine of its own, stopped after.
    ``watch``: ("module:function" run in every worker first, "module:function" read at the end).
    ``env``: environment variables of this engine beyond the session's. ``refusals``: a request that
    raises is recorded (``engine.py``), not the job's end."""
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    key = engine_key(model, engine, tp, env)
    json.dump({"model": str(model), "engine": key.settings, "max_tokens": max_tokens, "rounds": rounds,
               "positions": positions, "one_by_one": one_by_one, "refusals": refusals,
               **({"watch": list(watch)} if watch else {}),
               "requests": [{"prompt": p, **(i if isinstance(i, dict) else {"image": i})} for p, i in requests]},
              open(job, "w"))
    got = POOL.run(key, job, out, tmp_path / "engine.log", fresh=fresh)
    return {**got, "ranks": read_ranks(got["ranks"])}   # each rank's history: PruneRecords again


def stop_engine(model: Path, engine: dict, tp: int = 1, env: dict | None = None) -> None:
    """Stop the live engine of these settings, if any (one a request may have killed): the next job
    on them starts a fresh one."""
    key = engine_key(model, engine, tp, env)
    if key in POOL.live:
        POOL._stop(key)


def assert_same_as_transformers(got: dict, expected: list, asked: list) -> None:
    """Every round of ``run_engine``'s outputs ``got`` equals transformers' runs ``expected`` request
    for request (``asked``: each request's case, named in a failure): the prompt ids and the greedy
    output; and the engine's one rank kept and merged exactly the tokens transformers did."""
    for round_, outputs in enumerate(got["rounds"]):
        for out, want, case in zip(outputs, expected, asked, strict=True):
            assert out["prompt_token_ids"] == want["prompt_ids"], (round_, case)
            assert out["output_token_ids"] == want["output_ids"], (round_, case)
    (rank,) = got["ranks"]
    kept = {(tuple(r.indices.tolist()), tuple(r.assignment.tolist())) for r in rank["history"]}
    assert kept == {(tuple(w["indices"][0]), tuple(w["assignment"][0])) for w in expected}


def with_method(media, method: str) -> dict:
    """A request's media (``run_engine``'s form: file(s), or a dict) asking for ``method`` per request
    (``mm_processor_kwargs``); :func:`transformers_run` reads the media and ignores the rest."""
    return {**(media if isinstance(media, dict) else {"image": media}),
            "mm_processor_kwargs": {"desap": {"method": method}}}


def spread_methods(requests: list, start: int = 0) -> list:
    """``requests`` ([(prompt, media)]) with ``METHODS`` in turn from the ``start``-th, one a request:
    [(prompt, media asking for its method, method)]."""
    return [(prompt, with_method(media, METHODS[(start + i) % len(METHODS)]), METHODS[(start + i) % len(METHODS)])
            for i, (prompt, media) in enumerate(requests)]


def save_video(folder: Path, name: str, frames: int, width: int, height: int, seed: int, fps: float = 2.0) -> dict:
    """A video of random frames (saved as .npy) with the metadata vLLM's Qwen2.5-VL needs with it;
    :func:`run_engine` and :func:`transformers_run` take it as ``{"video": ...}``."""
    pixels = (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype("uint8")
    path = folder / f"{name}.npy"
    np.save(path, pixels)
    return {"frames": str(path), "metadata": {"fps": fps, "duration": frames / fps, "total_num_frames": frames,
                                              "frames_indices": list(range(frames)), "video_backend": "opencv"}}


def save_image(folder: Path, name: str, width: int, height: int, seed: int) -> str:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    path = folder / f"{name}.png"
    Image.fromarray(pixels).save(path)
    return str(path)


class _Checkpoints(dict):
    """The session's checkpoints and images; the Qwen3-generation checkpoints saved on first use."""

    def __init__(self, folder: Path, saved: dict):
        super().__init__(saved)
        self.folder = folder

    def __missing__(self, name: str) -> Path:
        if name not in LATER:
            raise KeyError(name)
        self[name] = save_qwen_checkpoint(LATER[name](0), self.folder / name)
        return self[name]


# saved when first asked for: dense and MoE Qwen3-VL and Qwen3.5 (in float32, as saved before)
LATER = {"qwen3_vl": tiny_vllm_qwen3_vl, "qwen3_vl_moe": lambda seed: tiny_vllm_qwen3_vl(seed, moe=True),
         "qwen3_vl_64": lambda seed: tiny_vllm_qwen3_vl(seed, positions=64),
         "qwen3_5": tiny_vllm_qwen3_5, "qwen3_5_moe": lambda seed: tiny_vllm_qwen3_5(seed, moe=True)}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL checkpoints (seeded), with images, saved once per
    session (and the Qwen3 generation's, ``LATER``, when first asked for). Qwen2.5-VL makes 16 tokens
    of a 112 x 112 image, 8 of a 112 x 56 or 56 x 112 one."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return _Checkpoints(folder, {
        "llava": save_llava_checkpoint(BUILDERS["llava"](0), folder / "llava"),
        "llava_next": save_llava_checkpoint(BUILDERS["llava_next"](0), folder / "llava_next"),
        "qwen2_5_vl": save_qwen_checkpoint(BUILDERS["qwen2_5_vl"](0), folder / "qwen2_5_vl"),
        "square": save_image(folder, "square", 56, 56, 1), "other": save_image(folder, "other", 56, 56, 2),
        "wide": save_image(folder, "wide", 112, 56, 3), "odd": save_image(folder, "odd", 60, 100, 4),
        "large": save_image(folder, "large", 112, 112, 5), "large2": save_image(folder, "large2", 112, 112, 6),
        "tall": save_image(folder, "tall", 56, 112, 7)})


def rendered_chat(folder: Path, messages: list) -> str:
    """The prompt the checkpoint's chat template renders for OpenAI chat ``messages`` (with the
    generation prompt), as vLLM renders it for a template that loops over a message's parts: a
    string content becomes one text part, an ``image_url`` part an ``image`` part, a ``video_url``
    a ``video`` part."""
    from transformers import AutoProcessor

    kinds = {"image_url": {"type": "image"}, "video_url": {"type": "video"}}
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
              else [kinds.get(part["type"], part) for part in m["content"]]} for m in messages]
    return AutoProcessor.from_pretrained(folder).apply_chat_template(parts, add_generation_prompt=True, tokenize=False)


def as_engine_defaults(options: dict, processor) -> dict:
    """``apply_desap``'s options as DeSAP's vLLM engine reads the same request by default: with the
    markers of the checkpoint's chat template (``chat: true``), unless ``options`` sets ``chat``
    (None, as the engine's ``chat: false``)."""
    return {"chat": processor.tokenizer, **options}


def transformers_run(kind: str, folder: Path, prompt: str, image_files, options: dict = None,
                     max_tokens: int = 8) -> dict:
    """The same checkpoint, prompt and image in transformers (with ``apply_desap(**options)`` when
    given): the prompt's ids, the greedy output ids, the kept indices and the rotary positions of
    the prompt (rows: the model's position kinds)."""
    from transformers import AutoProcessor

    from desap_ops.integrations import apply_desap, last_prune

    model = BUILDERS[kind](0)
    processor = AutoProcessor.from_pretrained(folder)
    media = image_files if isinstance(image_files, dict) else {"image": image_files}   # a video too (save_video)
    image_files, video = media.get("image"), media.get("video")
    images = None if image_files is None else [
        Image.open(f).convert("RGB") for f in ([image_files] if isinstance(image_files, str) else image_files)]
    text_prompt = prompt
    more = {}
    if video is not None:
        from transformers.video_utils import VideoMetadata

        more = {"videos": [np.load(video["frames"])], "video_metadata": [VideoMetadata(**video["metadata"])]}
    # the request's processor settings (with_method's "desap" is the plugin's, not the processor's)
    more.update({k: v for k, v in media.get("mm_processor_kwargs", {}).items() if k != "desap"})
    inputs = processor(text=prompt, images=images, return_tensors="pt", **more)
    if options is not None:
        apply_desap(model, **as_engine_defaults(options, processor))
    seen = []   # position_ids of each language-model forward; the first is the prompt's
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("position_ids")), with_kwargs=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    hook.remove()
    records = last_prune(model) if options is not None else None
    ids = inputs["input_ids"][0].tolist()
    image_token = model.config.image_token_id
    # images glued together (no token between their placeholders) make one run of placeholders
    glued = _run_lengths(processor.tokenizer(text_prompt)["input_ids"], image_token)
    budgets = None
    if options is not None and kind == "llava_next":   # an image's newlines may take it past keep
        from desap_ops.integrations.common.layout import packed_budget
        from desap_ops.integrations.hf.llava_next import image_layouts

        budgets = [packed_budget(options["keep"], s) for s in image_layouts(model, inputs["image_sizes"])]
    prompt = ids if options is None else _pruned(ids, image_token, options["keep"], glued, budgets)
    if video is not None and options is not None:   # the placeholders of the tokens the video kept
        (video_tokens,) = (inputs["video_grid_thw"].prod(-1) // model.config.vision_config.spatial_merge_size**2)
        prompt = _kept(prompt, model.config.video_token_id, int(video_tokens), records[-1].indices.tolist())
    # generate gives back the caller's prompt in front of the new tokens, or (older apply_desap) the pruned one
    served = len(ids) if out[0, :len(ids)].tolist() == ids else len(prompt)
    return {"prompt_ids": prompt, "output_ids": out[0, served:].tolist(),
            "indices": [r.indices.tolist() for r in records] if records else None,
            "assignment": [r.assignment.tolist() for r in records] if records else None,
            "text_tokens": [r.text_tokens for r in records] if records else None,
            "positions": None if seen[0] is None else seen[0].reshape(-1, seen[0].shape[-1]).tolist()}


def transformers_logits(kind: str, folder: Path, prompt: str, media: dict, options: dict, continuation: list):
    """transformers (with ``apply_desap(**options)`` when given) on the prompt of :func:`transformers_run`
    followed by ``continuation`` (an engine's greedy tokens): (len(continuation), vocab) float32,
    row k the logits that predict token k (teacher forcing)."""
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from desap_ops.integrations import apply_desap

    model = BUILDERS[kind](0)
    processor = AutoProcessor.from_pretrained(folder)
    more = {}
    if media.get("image") is not None:
        more["images"] = [Image.open(media["image"]).convert("RGB")]
    if media.get("video") is not None:
        video = media["video"]
        more.update(videos=[np.load(video["frames"])], video_metadata=[VideoMetadata(**video["metadata"])])
    inputs = processor(text=prompt, return_tensors="pt", **more)
    extra = torch.tensor([continuation])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    if options is not None:
        apply_desap(model, **as_engine_defaults(options, processor))
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    return logits[-len(continuation) - 1:-1]


def _run_lengths(ids: list, token: int) -> list:
    """Lengths of the runs of ``token`` in ``ids``, in order."""
    runs, previous = [], None
    for t in ids:
        if t == token and previous == token:
            runs[-1] += 1
        elif t == token:
            runs.append(1)
        previous = t
    return runs


def _pruned(ids: list, image_token: int, keep: int, images_per_run: list = None, budgets: list = None) -> list:
    """``ids`` with each run of image placeholders cut to its first ``keep`` (``keep`` per image
    where ``images_per_run`` says a run holds several glued images; ``budgets``: each image's own)."""
    out, run, index, image, allowed = [], 0, -1, 0, 0
    for t in ids:
        if t == image_token and run == 0:
            index += 1
            images = images_per_run[index] if images_per_run and index < len(images_per_run) else 1
            allowed = keep * images if budgets is None else sum(budgets[image:image + images])
            image += images
        run = run + 1 if t == image_token else 0
        if t != image_token or run <= allowed:
            out.append(t)
    return out


def _kept(ids: list, token: int, count: int, kept: list) -> list:
    """``ids`` holding one medium's ``count`` placeholders of ``token`` (in one run, or in runs per
    frame with text between: Qwen3-VL) without those whose index is not in ``kept``."""
    out, index, kept = [], 0, set(kept)
    for t in ids:
        if t == token:
            index += 1
            if index - 1 not in kept:
                continue
        out.append(t)
    assert index == count, (index, count)
    return out


def qwen3_video_span(ids: list, start: int = 153, end: int = 154, tokens: tuple = (151, 152)) -> range:
    """Where transformers' Qwen3-VL prompt ``ids`` hold their (one) video's frames: from the first
    frame's timestamp (after the prompt's own ``<|vision_start|>``) to the last frame's
    ``<|vision_end|>`` (before the prompt's own). A frame's start marker is followed by its tokens
    or its end marker; the prompt's by the first timestamp word."""
    first = next(i + 1 for i, t in enumerate(ids[:-1]) if t == start and ids[i + 1] not in (end, *tokens))
    last = next(i for i in range(first, len(ids) - 1) if ids[i] == ids[i + 1] == end)
    return range(first, last + 1)


def as_vllm_video_prompt(ids: list, video_token: int = 152) -> list:
    """transformers' pruned Qwen3-VL prompt as DeSAP's vLLM plugin holds it: the video's span the
    same length, every id in it ``<|video_pad|>`` (the model writes the span's embeddings)."""
    span = qwen3_video_span(ids)
    return ids[:span.start] + [video_token] * len(span) + ids[span.stop:]


QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def qwen3_media(folder: Path) -> dict:
    """Media of the Qwen3-generation tests (16-pixel patches: an image of 112 x 112 pixels becomes
    128 x 128, 16 tokens): a video of 6 frames 128 x 64 at 1 fps (3 x 8 = 24 tokens, 3 timestamps)
    and one of 2 frames 64 x 64 (4 tokens)."""
    return {"large": save_image(folder, "large", 112, 112, 5), "large2": save_image(folder, "large2", 112, 112, 6),
            "wide": save_video(folder, "wide", 6, 128, 64, 11, fps=1.0),
            "small": save_video(folder, "small", 2, 64, 64, 12)}


def qwen3_requests(media: dict) -> list:
    """Two prompts on one image, a video beside an image, a video under ``keep`` tokens."""
    return [(QWEN_PROMPTS[0], media["large"]), (QWEN_PROMPTS[1], media["large"]),
            (f"USER: {QWEN_VIDEO} {QWEN_IMAGE} what is the color of the sky ? ASSISTANT:",
             {"video": media["wide"], "image": media["large2"]}),
            (f"USER: {QWEN_VIDEO} how many people are there ? ASSISTANT:", {"video": media["small"]})]


def qwen3_expected(kind: str, folder: Path, requests: list, options: dict, methods: list | None = None) -> list:
    """transformers' runs, their prompts as DeSAP's vLLM plugin holds them (a video's span all
    placeholders: :func:`as_vllm_video_prompt`; transformers' own under "transformers_ids").
    ``methods``: each request's pruning method (None: ``options``' own)."""
    methods = methods or [None] * len(requests)
    expected = [transformers_run(kind, folder, prompt, item, options if method is None else {**options, "method": method})
                for (prompt, item), method in zip(requests, methods, strict=True)]
    for want, (_, item) in zip(expected, requests):
        if isinstance(item, dict) and "video" in item:
            want["transformers_ids"], want["prompt_ids"] = want["prompt_ids"], as_vllm_video_prompt(want["prompt_ids"])
    return expected


def assert_same_answers(got: dict, expected: list, model_class: str) -> None:
    """Every round of an engine run gave each request ``transformers_run``'s prompt ids and greedy
    tokens, on the DeSAP class ``model_class``, which kept the same tokens as apply_desap."""
    for round_, outputs in enumerate(got["rounds"]):
        for i, (out, want) in enumerate(zip(outputs, expected, strict=True)):
            assert out["prompt_token_ids"] == want["prompt_ids"], (round_, i)
            assert out["output_token_ids"] == want["output_ids"], (round_, i, out["output_token_ids"], want["output_ids"])
    (rank,) = got["ranks"]
    assert rank["class"] == model_class
    assert {tuple(r.indices.tolist()) for r in rank["history"]} == {tuple(k) for e in expected for k in e["indices"]}


def assert_alone_positions(out: dict, forwards: list, want: dict) -> list:
    """A request that ran alone (``one_by_one``): its forwards are its prefill chunks, from its
    cached tokens on, at exactly ``transformers_run``'s 3D positions, then one token each past their
    top. Returns where its prompt's chunks ended (the cached tokens' end first)."""
    hits = out["num_cached_tokens"]
    rows = [row[hits:] for row in want["positions"][-3:]]
    top = max(map(max, want["positions"][-3:]))
    decode = [(top + 1 + i,) * 3 for i in range(len(out["output_token_ids"]) - 1)]
    columns = [column for positions in forwards for column in zip(*positions)]
    assert columns == list(zip(*rows)) + decode, want["prompt_ids"]
    ends = [hits] if hits else []
    for positions in forwards:
        ends.append(ends[-1] + len(positions[0]) if ends else len(positions[0]))
    return ends


def assert_batched_positions(forwards: list, expected: list) -> None:
    """In one round's forwards (batched, unchunked), each request's prompt ran at exactly
    ``transformers_run``'s 3D positions, and the next forward decoded it one past their top."""
    columns = [list(zip(*positions)) for positions in forwards]
    for want in expected:
        prompt = list(zip(*want["positions"][-3:]))
        top = max(map(max, want["positions"][-3:]))
        found = [step for step, cols in enumerate(columns)
                 if any(cols[c:c + len(prompt)] == prompt for c in range(len(cols) - len(prompt) + 1))]
        assert found, want["prompt_ids"]
        assert (top + 1,) * 3 in columns[found[0] + 1]
