"""A differential fuzzer of DeSAP's vLLM plugin: each case is a random request made from its seed
alone, run in vLLM (engines shared by settings: ``engines.run_engine``) and in transformers with
``apply_desap`` on the same checkpoint, the same rendered prompt and the same processor options.

Random per case: the engine (one of ``ENGINES``, the settings other vLLM tests start anyway: LLaVA,
LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL, unchunked or prefilled in chunks of 5 tokens with 32-token
prefix-cache blocks), the pruning method and ``keep`` (down to 1, per request; now and then one
above the engine's ``max_keep``, which must be refused), Qwen's ``max_pixels`` (per request, up to
256 times the checkpoint's default), images of any size and shape (very long and thin ones among
them), videos (now and then a long one), up to the engine's ``limit_mm_per_prompt``, text before,
between and after them, the family's own chat template with or without a system prompt, one to
three user turns; and whether a second request continues the conversation (its prefix from the
cache). Every case runs twice (the second time from the prefix cache), each request alone.

Checked per case (``check``):
1. the engine stays alive: a text-only request after the case's still gets an answer;
2. each answer is a completion or a clean refusal (ValueError/TypeError, or vLLM's own 4xx
   ``VLLMClientError``, raised before the engine: never the engine's death), and a ``keep`` above
   ``max_keep`` is refused naming ``keep``;
3. each image and video reads as many text tokens as in transformers;
4. the prompt ids, the kept tokens and every forward's rotary positions equal transformers' (and
   the greedy tokens).

    PYTHONPATH=$PWD:$PWD/tests/on_vllm python tests/on_vllm/fuzz.py --seeds 200 --start 1000
    PYTHONPATH=$PWD:$PWD/tests/on_vllm python tests/on_vllm/fuzz.py --only 1234      # replay one seed

In CI, ``test_vllm_llava_fuzz.py``, ``test_vllm_qwen_fuzz.py`` and ``test_vllm_qwen3_fuzz.py`` run a
fixed seed set each, on their families' engines; their names sort them right before the tests that
start the same engines, so the pool's engines serve both (``DESAP_FUZZ_SEEDS=200 DESAP_FUZZ_START=1000``
runs other seeds there). Every failure prints its seed and the command that replays it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

import test_vllm_llava_sweep
import test_vllm_qwen3_vl
import test_vllm_qwen_sweep
from engines import (BUILDERS, ENGINE, METHODS, QWEN_KEEP_6, _kept, as_engine_defaults, as_vllm_video_prompt,
                     engine_key, rendered_chat, run_engine, save_image, save_video, stop_engine, POOL)

# the engines a case may run on: settings other tests of the suite start anyway (shared by settings)
ENGINES = {
    "llava-chunked": ("llava", test_vllm_llava_sweep._engine("llava")),
    "llava_next-chunked": ("llava_next", test_vllm_llava_sweep._engine("llava_next")),
    "qwen2_5_vl-batch": ("qwen2_5_vl", QWEN_KEEP_6),
    "qwen2_5_vl-chunked": ("qwen2_5_vl", test_vllm_qwen_sweep.CHUNKED),
    "qwen3_vl-batch": ("qwen3_vl", test_vllm_qwen3_vl.ENGINE),
    "qwen3_vl-chunked": ("qwen3_vl", test_vllm_qwen3_vl.CHUNKED),
}
# pixels a Qwen token covers (patch x merge), per side: Qwen2.5-VL 14 x 2, Qwen3-VL 16 x 2
TOKEN_SIDE = {"qwen2_5_vl": 28, "qwen3_vl": 32}
# the tiny checkpoints' tokenizers know these words (the rest of a prompt's text is their chat markers)
WORDS = ("what is the color of sky ? read text on sign how many people are there tree and this show me find "
         "small large object corner center face hand").split() + [f"w{i}" for i in range(54, 128) if i != 100]
PROBE = "USER: what is the color of the sky ? ASSISTANT:"   # text only: answered while the engine lives
MAX_TOKENS = 4
REPLAY = "PYTHONPATH=$PWD:$PWD/tests/on_vllm {python} tests/on_vllm/fuzz.py --only {seed}"


@dataclass(frozen=True)
class Picture:
    width: int
    height: int
    seed: int


@dataclass(frozen=True)
class Clip:
    frames: int
    width: int
    height: int
    seed: int
    fps: float


Part = Union[str, Picture, Clip]   # a message part: words, an image or a video


class Message(NamedTuple):
    role: str
    parts: tuple   # of Part


@dataclass(frozen=True)
class Case:
    """One random request (and, with ``follow_up``, a second that continues its conversation)."""
    seed: int
    engine: str
    method: str
    keep: Optional[int]         # the request's own keep; None: the engine's
    max_pixels: Optional[int]   # Qwen's processor option, per request; None: the checkpoint's
    messages: tuple             # of Message, the last a user's
    follow_up: tuple            # Messages appended for a second request (empty: none)

    @property
    def family(self) -> str:
        return ENGINES[self.engine][0]

    @property
    def settings(self) -> dict:
        return ENGINES[self.engine][1]

    @property
    def engine_keep(self) -> int:
        desap = self.settings["hf_overrides"]["desap"]
        return desap.get("max_keep", desap["keep"])

    @property
    def refused_keep(self) -> bool:
        """Must the engine refuse it (a keep above the engine's max_keep)?"""
        return self.keep is not None and self.keep > self.engine_keep

    def describe(self) -> str:
        def part(p):
            if isinstance(p, Picture):
                return f"image {p.width}x{p.height}"
            if isinstance(p, Clip):
                return f"video {p.frames}f {p.width}x{p.height}@{p.fps}"
            return f"{len(p.split())} words"
        turns = " | ".join(f"{m.role}: " + ", ".join(map(part, m.parts)) for m in self.messages + self.follow_up)
        return (f"seed {self.seed}: {self.engine}, method {self.method}, keep {self.keep}, max_pixels "
                f"{self.max_pixels}, follow-up {bool(self.follow_up)}; {turns}")


def _words(rng: random.Random) -> str:
    n = rng.choice([1, 2, 3, 5, 8]) if rng.random() < 0.85 else rng.randint(20, 45)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _picture(rng: random.Random, family: str) -> Picture:
    seed = rng.randrange(1 << 30)
    if family.startswith("qwen") and rng.random() < 0.15:   # long and thin: many tokens on one axis
        # now and then past the rotary cache's extent (with a max_pixels to match), at an aspect
        # ratio Qwen's resize takes (below 200)
        long = rng.randint(400, 2400) if rng.random() < 0.7 else rng.choice([6000, 12000, 20000, 30000])
        short = rng.randint(28, 40) if long < 6000 else max(28, -(-long // rng.choice([120, 190])))
        return Picture(*((short, long) if rng.random() < 0.5 else (long, short)), seed)
    top = 240 if family.startswith("llava") else 300
    return Picture(rng.randint(16, top), rng.randint(16, top), seed)


def _clip(rng: random.Random) -> Clip:
    seed = rng.randrange(1 << 30)
    if rng.random() < 0.1:   # a long video of small frames: many frames' positions
        return Clip(rng.choice([24, 48, 96, 160]), 64, 64, seed, rng.choice([1.0, 2.0]))
    return Clip(rng.choice([1, 2, 2, 3, 4, 5, 6, 8]), rng.choice([32, 64, 96, 128]), rng.choice([32, 64, 96, 128]),
                seed, rng.choice([1.0, 2.0]))


def _user_turn(rng: random.Random, media: list) -> Message:
    """The media in random order, words before, between and after them now and then."""
    rng.shuffle(media)
    parts = []
    for item in media + [None]:
        if rng.random() < 0.5:
            parts.append(_words(rng))
        if item is not None:
            parts.append(item)
    return Message("user", tuple(parts) or (_words(rng),))


def generate(seed: int) -> Case:
    """The case of ``seed``: made from the seed alone."""
    rng = random.Random(seed)
    engine = rng.choice(sorted(ENGINES))
    family, settings = ENGINES[engine]
    limits = settings.get("limit_mm_per_prompt", ENGINE["limit_mm_per_prompt"])
    images = rng.randint(0, limits.get("image", 0))
    videos = rng.randint(0, limits.get("video", 0)) if family.startswith("qwen") else 0
    if images + videos == 0:
        images = 1
    media = [_picture(rng, family) for _ in range(images)] + [_clip(rng) for _ in range(videos)]
    method = rng.choice(METHODS)
    desap = settings["hf_overrides"]["desap"]
    top = desap.get("max_keep", desap["keep"])
    roll = rng.random()
    keep = top + 1 if roll < 0.06 else None if roll < 0.2 else rng.choice([1, 2, rng.randint(1, top), top])
    max_pixels = None
    if family in TOKEN_SIDE and any(isinstance(m, Picture) and max(m.width, m.height) >= 6000 for m in media) \
            and rng.random() < 0.7:   # let the very long image be long in tokens too
        max_pixels = rng.choice([1024, 4096]) * TOKEN_SIDE[family] ** 2
    elif family in TOKEN_SIDE and rng.random() < 0.35:
        max_pixels = rng.choice([4, 32, 64, 256, 1024, 4096]) * TOKEN_SIDE[family] ** 2
    turns = rng.choice([1, 1, 2, 3])
    owner = [rng.randrange(turns) for _ in media]
    messages = [Message("system", (_words(rng),))] if rng.random() < 0.4 else []
    for turn in range(turns):
        if turn:
            messages.append(Message("assistant", (_words(rng),)))
        messages.append(_user_turn(rng, [m for m, o in zip(media, owner) if o == turn]))
    follow_up = ((Message("assistant", (_words(rng),)), Message("user", (_words(rng),)))
                 if rng.random() < 0.25 else ())
    return Case(seed, engine, method, keep, max_pixels, tuple(messages), follow_up)


# --- the requests, both sides ------------------------------------------------------------------

class Request(NamedTuple):
    prompt: str
    images: list          # files, in the prompt's order
    video: Optional[dict]  # save_video's
    processor_kwargs: dict   # Qwen's max_pixels (both sides pass it to the Hugging Face processor)
    options: dict         # apply_desap's (the engine's, the request's over them)


def _chat(messages) -> list:
    """OpenAI chat messages (``engines.rendered_chat`` renders them with the checkpoint's template)."""
    def part(p):
        if isinstance(p, Picture):
            return {"type": "image_url"}
        if isinstance(p, Clip):
            return {"type": "video_url"}
        return {"type": "text", "text": p}
    return [{"role": m.role, "content": m.parts[0] if m.role == "system" else [part(p) for p in m.parts]}
            for m in messages]


def requests_of(case: Case, folder: Path, media_folder: Path) -> list:
    """The case's requests (one, or two with a follow-up), their media saved in ``media_folder``."""
    files = {}

    def saved(item):
        if item not in files:
            name = f"s{case.seed}-{len(files)}"
            if isinstance(item, Picture):
                files[item] = save_image(media_folder, name, item.width, item.height, item.seed)
            else:
                files[item] = save_video(media_folder, name, item.frames, item.width, item.height, item.seed, item.fps)
        return files[item]

    out = []
    for messages in ([case.messages, case.messages + case.follow_up] if case.follow_up else [case.messages]):
        items = [p for m in messages for p in m.parts if not isinstance(p, str)]
        videos = [saved(p) for p in items if isinstance(p, Clip)]
        assert len(videos) <= 1   # the engines' limit (and engine.py's form)
        out.append(Request(rendered_chat(folder, _chat(messages)), [saved(p) for p in items if isinstance(p, Picture)],
                           videos[0] if videos else None,
                           {} if case.max_pixels is None else {"max_pixels": case.max_pixels},
                           {**case.settings["hf_overrides"]["desap"], "method": case.method,
                            **({} if case.keep is None else {"keep": case.keep})}))
    return out


def vllm_request(case: Case, request: Request) -> tuple:
    """``run_engine``'s form of a request."""
    desap = {"method": case.method, **({} if case.keep is None else {"keep": case.keep})}
    media = {"image": request.images or None, "mm_processor_kwargs": {"desap": desap, **request.processor_kwargs}}
    if request.video is not None:
        media["video"] = request.video
    return request.prompt, media


class Expected(NamedTuple):
    prompt_ids: list      # as DeSAP's vLLM plugin holds the pruned prompt
    output_ids: list
    records: list         # per image, then video: (kept indices, text tokens read)
    positions: list       # rows (1: LLaVA, 3: M-RoPE) of the served prompt's rotary positions


def transformers_side(family: str, folder: Path, request: Request) -> Expected:
    """transformers with apply_desap on the same checkpoint, rendered prompt and processor options."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from desap_ops.integrations import apply_desap, last_prune
    from desap_ops.integrations.hf.registry import image_token_counts

    model = BUILDERS[family](0)
    processor = AutoProcessor.from_pretrained(folder)
    more = dict(request.processor_kwargs)
    if family == "qwen3_vl" and "max_pixels" in more and request.video is not None:
        # vLLM folds max_pixels into a Qwen3-VL video's size (Qwen3VLVideoProcessor takes no
        # max_pixels; qwen3_vl.py, _get_vision_size): so does this side
        default = processor.video_processor.size
        size = {"shortest_edge": default.shortest_edge, "longest_edge": more["max_pixels"]}
        more = {"images_kwargs": {"max_pixels": more["max_pixels"]}, "videos_kwargs": {"size": size}}
    if request.images:
        more["images"] = [Image.open(f).convert("RGB") for f in request.images]
    if request.video is not None:
        from transformers.video_utils import VideoMetadata

        more.update(videos=[np.load(request.video["frames"])],
                    video_metadata=[VideoMetadata(**request.video["metadata"])])
    inputs = processor(text=request.prompt, return_tensors="pt", **more)
    apply_desap(model, **as_engine_defaults(request.options, processor))
    seen = []   # the language model's first forward: the served prompt's positions and length
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs.get("position_ids"), kwargs["inputs_embeds"].shape[1])),
        with_kwargs=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    hook.remove()
    records = last_prune(model)
    ids = inputs["input_ids"][0].tolist()
    config = model.config
    merge = getattr(config.vision_config, "spatial_merge_size", 1)
    if not request.images:
        counts = []
    elif "image_grid_thw" in inputs:
        counts = (inputs["image_grid_thw"].prod(-1) // merge ** 2).tolist()
    else:
        counts = image_token_counts(model, inputs["pixel_values"], inputs.get("image_sizes"))
    kept = [len(r.indices) for r in records]   # the placeholders each image sends
    if family == "llava_next":   # its kept visual tokens and every newline of its layout (common.layout)
        from desap_ops.integrations.common.layout import packed_budget, packed_sources

        keep = request.options["keep"]
        kept[:len(counts)] = [packed_budget(keep, s) for s in packed_sources(config, inputs["image_sizes"].tolist())]
    # each image's placeholders cut to the tokens it kept (the images in order, glued ones too)
    image_token = getattr(config, "image_token_id", None) or config.image_token_index
    prompt, seen_images, bounds = [], 0, np.cumsum([0] + list(counts))
    for t in ids:
        if t == image_token:
            image = int(np.searchsorted(bounds, seen_images, side="right")) - 1
            seen_images += 1
            if seen_images - 1 - bounds[image] >= kept[image]:
                continue
        prompt.append(t)
    assert seen_images == bounds[-1], (seen_images, counts)
    if request.video is not None:
        (tokens,) = inputs["video_grid_thw"].prod(-1) // merge ** 2
        prompt = _kept(prompt, config.video_token_id, int(tokens), records[-1].indices.tolist())
        if family == "qwen3_vl":
            prompt = as_vllm_video_prompt(prompt)
    positions, served = seen[0]
    assert served == len(prompt), f"transformers served {served} tokens, the rule gives {len(prompt)}"
    rows = [list(range(served))] if positions is None else positions.reshape(-1, served).tolist()
    rows = rows[-3:] if family in TOKEN_SIDE else rows[-1:]
    start = len(ids) if out[0, :len(ids)].tolist() == ids else served
    return Expected(prompt, out[0, start:].tolist(),
                    [(tuple(r.indices.tolist()), r.text_tokens) for r in records], rows)


# --- checking -----------------------------------------------------------------------------------

class Finding(NamedTuple):
    check: str    # "engine died", "unclean refusal", "not refused", "prompt ids", "text tokens", "kept tokens",
    #               "positions", "output", "transformers", "harness"
    detail: str


# a clean refusal: raised before the engine, a 400 in vLLM's server (vLLM's VLLMClientError is its 4xx)
CLEAN = ("ValueError", "TypeError", "VLLMClientError")


def _clean(out: dict) -> bool:
    return bool(set(out.get("kinds", [out["refused"]])) & set(CLEAN)) and "EngineDead" not in out["message"]


def _columns(forward) -> list:
    """A forward's positions as columns (one number a token for LLaVA, three for M-RoPE)."""
    return [(p,) for p in forward] if forward and not isinstance(forward[0], list) else list(zip(*forward))


def check(case: Case, got: dict, expected: list) -> list:
    """What went wrong (the module docstring's four checks), as findings; ``expected`` per request:
    an ``Expected``, or the text of the exception transformers raised."""
    findings = []
    count = len(expected)
    for round_, outputs in enumerate(got["rounds"]):
        *answers, probe = outputs
        if "refused" in probe:
            findings.append(Finding("engine died", f"round {round_}: the text-only request after the case got "
                                    f"{probe['refused']}: {probe['message'][-300:]}"))
        for i, (out, want) in enumerate(zip(answers, expected, strict=True)):
            where = f"round {round_}, request {i}"
            if "refused" in out:
                if not _clean(out):
                    findings.append(Finding("engine died" if "Dead" in out["refused"] + out["message"] else
                                            "unclean refusal", f"{where}: {out['refused']}: {out['message'][-300:]}"))
                elif case.refused_keep and "keep" not in out["message"]:
                    findings.append(Finding("unclean refusal", f"{where}: the refusal does not name keep: "
                                            f"{out['message'][-300:]}"))
                continue
            if case.refused_keep:
                findings.append(Finding("not refused", f"{where}: keep {case.keep} above max_keep {case.engine_keep} "
                                        "was served"))
                continue
            if isinstance(want, str):
                continue   # transformers raised (reported once, below); vLLM's answer is not compared
            if out["prompt_token_ids"] != want.prompt_ids:
                findings.append(Finding("prompt ids", f"{where}: vLLM {len(out['prompt_token_ids'])} ids, "
                                        f"transformers {len(want.prompt_ids)}; first difference at "
                                        f"{_first_difference(out['prompt_token_ids'], want.prompt_ids)}"))
                continue
            forwards = got["positions"][round_][i]
            hits = out["num_cached_tokens"]
            top = max(map(max, want.positions))
            decode = [(top + 1 + k,) * len(want.positions) for k in range(len(out["output_token_ids"]) - 1)]
            columns = [c for f in forwards for c in _columns(f)]
            wanted = list(zip(*want.positions))[hits:] + decode
            if columns != wanted:
                at = _first_difference(columns, wanted)
                findings.append(Finding("positions", f"{where} ({hits} cached): first difference at {at} of "
                                        f"{len(wanted)}: vLLM {columns[at:at + 4]}, transformers {wanted[at:at + 4]}"))
            if out["output_token_ids"] != want.output_ids:
                findings.append(Finding("output", f"{where}: {out['output_token_ids']} != {want.output_ids}"))
    for i, want in enumerate(expected):
        # both refusing a request cleanly (Qwen's resize refuses an aspect ratio above 200) is agreement
        refused = all("refused" in r[i] and _clean(r[i]) for r in got["rounds"])
        if isinstance(want, str) and not case.refused_keep and not (refused and want.startswith(CLEAN)):
            findings.append(Finding("transformers", f"request {i}: transformers raised {want}"))
    served = [w for w, outs in zip(expected, zip(*[r[:count] for r in got["rounds"]]))
              if not isinstance(w, str) and all("refused" not in o for o in outs)]
    if served and got["ranks"] and not case.refused_keep:
        records = [(tuple(r.indices.tolist()), r.text_tokens) for r in got["ranks"][0]["history"]]
        wanted = {r for w in served for r in w.records}
        if set(records) != wanted:
            by_indices = {k: n for k, n in wanted}
            text = [(len(k), n, by_indices[k]) for k, n in records if k in by_indices and by_indices[k] != n]
            if text:
                findings.append(Finding("text tokens", "(kept, vLLM read, transformers read): " + str(text)))
            else:
                if {n for _, n in records} != {n for _, n in wanted}:   # another text read, other tokens kept
                    findings.append(Finding("text tokens", f"vLLM's items read {sorted({n for _, n in records})} "
                                            f"text tokens, transformers' {sorted({n for _, n in wanted})}"))
                findings.append(Finding("kept tokens", f"vLLM kept {sorted(set(records))}, transformers "
                                        f"{sorted(wanted)}"))
    return findings


def _root_cause(log: Path) -> str:
    """The last exception line the engine's log shows (the worker's, before EngineDeadError)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if "Error: " in line and "EngineDeadError" not in line and "EngineCore encountered" not in line]
    return lines[-1][-400:] if lines else "(none in the engine's log)"


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Outcome(NamedTuple):
    case: Case
    findings: list
    refusals: list    # the clean refusals' messages (expected or not)
    seconds: float


def run_case(case: Case, checkpoints, tmp_path: Path) -> Outcome:
    """Run one case in both engines; its findings."""
    start = time.perf_counter()
    folder = checkpoints[case.family]
    requests = requests_of(case, folder, tmp_path)
    expected = []
    for request in requests:
        try:
            expected.append(transformers_side(case.family, folder, request))
        except Exception as error:   # reported as a finding unless the engine must refuse it too
            expected.append(f"{type(error).__name__}: {str(error)[-300:]}")
    jobs = [vllm_request(case, r) for r in requests] + [(PROBE, {"image": None})]
    try:
        got = run_engine(tmp_path, folder, case.settings, jobs, max_tokens=MAX_TOKENS, rounds=2, positions=True,
                         one_by_one=True, refusals=True)
    except AssertionError as error:   # the engine process ended or hung
        return Outcome(case, [Finding("engine died", str(error)[-600:])], [], time.perf_counter() - start)
    findings = check(case, got, expected)
    if any(f.check == "engine died" for f in findings):
        stop_engine(folder, case.settings)   # the next case on these settings starts a fresh engine
        findings.append(Finding("engine died", "the worker's error: " + _root_cause(tmp_path / "engine.log")))
    refusals = sorted({f"{o['refused']}: {o['message'][-200:]}" for r in got["rounds"] for o in r if "refused" in o})
    return Outcome(case, findings, refusals, time.perf_counter() - start)


def test_cases(engines: tuple, ci_seeds: tuple) -> dict:
    """A test module's cases, {seed: Case}, grouped by engine: ``ci_seeds`` (each must fall on one of
    ``engines``), or with ``DESAP_FUZZ_SEEDS`` that many seeds from ``DESAP_FUZZ_START`` (0), those of
    them that fall on ``engines``."""
    if "DESAP_FUZZ_SEEDS" in os.environ:
        start = int(os.environ.get("DESAP_FUZZ_START", "0"))
        cases = [c for c in map(generate, range(start, start + int(os.environ["DESAP_FUZZ_SEEDS"])))
                 if c.engine in engines]
    else:
        cases = list(map(generate, ci_seeds))
        elsewhere = [(c.seed, c.engine) for c in cases if c.engine not in engines]
        if elsewhere:
            raise ValueError(f"ci_seeds must fall on the engines {engines}; these do not: {elsewhere}")
    order = list(ENGINES)
    return {c.seed: c for c in sorted(cases, key=lambda c: (order.index(c.engine), c.seed))}


def assert_case(case: Case, checkpoints, tmp_path: Path) -> None:
    """Run ``case``; fail with its findings, its seed and the command that replays it."""
    outcome = run_case(case, checkpoints, tmp_path)
    assert not outcome.findings, report(outcome, sys.executable)


def plan(cases: list, checkpoints) -> list:
    """The cases grouped by engine (the catalogue's order), and the pool told which engines come."""
    order = list(ENGINES)
    cases = sorted(cases, key=lambda c: (order.index(c.engine), c.seed))
    POOL.plan([engine_key(checkpoints[c.family], c.settings) for c in cases])
    return cases


def report(outcome: Outcome, python: str = "python") -> str:
    lines = [f"FAIL {outcome.case.describe()}"]
    lines += [f"  [{f.check}] {f.detail}" for f in outcome.findings]
    lines.append("  replay: " + REPLAY.format(python=python, seed=outcome.case.seed))
    return "\n".join(lines)


class Checkpoints(dict):
    """The tiny checkpoints, saved under ``folder`` on first use (kept there between runs: the
    builders are seeded)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, family: str) -> Path:
        from desap_ops.testing.checkpoint import save_llava_checkpoint, save_qwen_checkpoint

        path = self.folder / family
        if not (path / "config.json").exists():
            save = save_llava_checkpoint if family.startswith("llava") else save_qwen_checkpoint
            save(BUILDERS[family](0), path)
        self[family] = path
        return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds, from --start")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--only", type=int, nargs="*", help="these seeds only (replay)")
    parser.add_argument("--engines", nargs="*", help="only cases on these engines (names of ENGINES)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "desap-fuzz",
                        help="where the checkpoints are saved (and kept)")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per case here")
    parser.add_argument("--describe", action="store_true", help="print the cases, run nothing")
    args = parser.parse_args(argv)
    seeds = args.only if args.only else range(args.start, args.start + args.seeds)
    cases = [generate(s) for s in seeds]
    if args.engines:
        cases = [c for c in cases if c.engine in args.engines]
    if args.describe:
        print("\n".join(c.describe() for c in cases))
        return 0
    args.folder.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(args.folder / "checkpoints")
    failed = 0
    for case in plan(cases, checkpoints):
        work = Path(tempfile.mkdtemp(prefix=f"case-{case.seed}-", dir=args.folder))
        try:
            outcome = run_case(case, checkpoints, work)
        except Exception:
            outcome = Outcome(case, [Finding("harness", traceback.format_exc()[-1500:])], [], 0.0)
        failed += bool(outcome.findings)
        print(report(outcome, sys.executable) if outcome.findings else
              f"ok   {case.describe()} ({outcome.seconds:.1f} s)" +
              (f"; refused: {outcome.refusals}" if outcome.refusals else ""), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as log:
                log.write(json.dumps({"seed": case.seed, "engine": case.engine, "describe": case.describe(),
                                      "findings": [f._asdict() for f in outcome.findings],
                                      "refusals": outcome.refusals, "seconds": round(outcome.seconds, 1)}) + "\n")
    print(f"{failed} of {len(cases)} cases failed")
    POOL.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
