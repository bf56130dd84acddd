"""DeSAP's Qwen2.5-VL positions through vLLM's V2 model runner path, which the CPU build cannot run
(its V2 runner needs Triton's CPU backend). vLLM's own objects run here on CPU: the encoder cache,
the encoder runner's window gather and the ``MultiModalPruner`` that the plugin's hook builds.
Stand-ins take the place of the rope state's buffers (vLLM's own read and write methods run on
them; the buffers need pinned memory), the input batch, the request states and the model, which
carries the DeSAP class's own M-RoPE methods and the checkpoint's config. Every chunking and
prefix-cache start must end at the positions transformers with apply_desap gives, as the V1
engine tests check."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engines import QWEN_IMAGE, transformers_run

OPTIONS = {"keep": 6}
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
FILLER = " ".join(f"w{60 + i % 80}" for i in range(300))   # absolute positions past 256
CASES = [  # (prompt, images, embedding dtype)
    (f"{SYSTEM}{QWEN_IMAGE}{QWEN_IMAGE} how many people are there ? ASSISTANT:", ["large", "tall"], torch.float32),
    (f"USER: {QWEN_IMAGE} what is the color of the sky ? ASSISTANT:", ["wide"], torch.float32),
    (f"{FILLER} {QWEN_IMAGE} read {QWEN_IMAGE} the {QWEN_IMAGE} sign ASSISTANT:", ["tall", "large", "wide"],
     torch.bfloat16),
]
HIDDEN = 128   # the checkpoint language model's width


class DesapStandIn:
    """The DeSAP model as the runner sees it: vLLM's grid reader, the DeSAP M-RoPE methods."""

    supports_multimodal_pruning = True
    desap_recomputes_mrope = True

    def __init__(self, config):
        from desap_ops.integrations.vllm.qwen2_5_vl import DesapQwen2_5_VLForConditionalGeneration as Desap
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Qwen

        self.config, self.desap = config, SimpleNamespace(**OPTIONS)
        for name, owner in (("iter_mm_grid_thw", Qwen), ("get_mrope_input_positions", Desap),
                            ("recompute_mrope_positions", Desap)):
            setattr(self, name, getattr(owner, name).__get__(self))


def _rope_state(requests: int, length: int):
    from vllm.v1.worker.gpu.mm.rope import RopeState

    rope = RopeState.__new__(RopeState)   # vLLM's read / update methods over plain CPU buffers
    rope.num_dims = 3
    rope.prefill_positions = SimpleNamespace(gpu=torch.zeros(3 * requests, length, dtype=torch.int32))
    rope.prefill_delta = SimpleNamespace(np=np.zeros(requests, dtype=np.int32))
    return rope


@pytest.fixture(scope="module")
def cases(checkpoints):
    """Per case: transformers' run, the pruned prompt's features and its encoder outputs."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    from desap_ops.integrations.vllm.mrope import media_positions, with_position_channels

    folder = checkpoints["qwen2_5_vl"]
    config = AutoConfig.from_pretrained(folder)
    image_processor = AutoProcessor.from_pretrained(folder).image_processor
    out = []
    for c, (prompt, names, dtype) in enumerate(CASES):
        files = [checkpoints[n] for n in names]
        want = transformers_run("qwen2_5_vl", folder, prompt, files, OPTIONS)
        grids = image_processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["image_grid_thw"]
        ids = want["prompt_ids"]
        offsets = [i for i, t in enumerate(ids) if t == config.image_token_id and ids[i - 1] != t]
        features, outputs = [], {}
        for i, (offset, grid, kept) in enumerate(zip(offsets, grids, want["indices"])):
            name = f"case{c}-image{i}"
            features.append(MultiModalFeatureSpec(data={"image_grid_thw": SimpleNamespace(data=grid)},
                                                  modality="image", identifier=name,
                                                  mm_position=PlaceholderRange(offset, OPTIONS["keep"])))
            tokens = torch.randn(OPTIONS["keep"], HIDDEN).to(dtype)
            _, h, w = grid.tolist()
            outputs[name] = with_position_channels(tokens, media_positions(1, h // 2, w // 2)[:, kept])
        out.append({"ids": ids, "features": features, "outputs": outputs, "want": want})
    return config, out


def _schedule(cases, config, chunk: int, cached: int):
    """Prefill every case at once, ``chunk`` tokens a step, from ``cached`` prefix-cache hits on,
    through vLLM's V2 gather and the pruner the plugin has vLLM build; the rope state after it."""
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.mm.encoder_runner import EncoderRunner
    from vllm.v1.worker.gpu.model_states import default

    from desap_ops.integrations.vllm.mrope import CHANNELS, recompute_after_encoder

    model = DesapStandIn(config)
    length = max(len(c["ids"]) for c in cases)
    rope, cache = _rope_state(len(cases), length), EncoderCache()
    token_ids = torch.zeros(len(cases), length, dtype=torch.int32)
    for r, case in enumerate(cases):
        positions, delta = model.get_mrope_input_positions(case["ids"], case["features"])
        rope.prefill_positions.gpu[3 * r:3 * r + 3, :positions.shape[1]] = positions
        rope.prefill_delta.np[r] = delta
        token_ids[r, :len(case["ids"])] = torch.tensor(case["ids"])
        cache.add_request(f"req{r}", case["features"])
        cache.encoder_outputs.update(case["outputs"])
    recompute_after_encoder()   # every runner this vLLM has, V2 among them
    model_config = SimpleNamespace(multimodal_config=SimpleNamespace(is_multimodal_pruning_enabled=lambda: False),
                                   get_inputs_embeds_size=lambda: HIDDEN)
    pruner = default.maybe_create_mm_pruner(model_config, model, rope, cache)
    assert pruner is not None and default.maybe_create_mm_pruner(model_config, object(), rope, cache) is None
    gather = EncoderRunner(model, 1024, HIDDEN, cache, torch.float32, torch.device("cpu"))
    req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=token_ids))
    lengths = np.array([len(c["ids"]) for c in cases])
    computed = np.minimum(cached, lengths - 1)   # vLLM computes at least a prompt's last token
    while (computed < lengths).any():
        live = np.nonzero(computed < lengths)[0]
        scheduled = np.minimum(chunk, lengths[live] - computed[live])
        batch = SimpleNamespace(req_ids=[f"req{r}" for r in live], idx_mapping_np=live, prefill_len_np=lengths[live],
                                num_computed_prefill_tokens_np=computed[live], num_scheduled_tokens=scheduled)
        embeds, _ = gather.gather_mm_embeddings(batch.req_ids, int(scheduled.sum()), scheduled,
                                                np.concatenate([[0], np.cumsum(scheduled)]), lengths[live],
                                                computed[live])
        if embeds:
            cleaned = pruner.recompute(embeds, batch, req_states)
            assert [e.shape for e in cleaned] == [(e.shape[0], HIDDEN) for e in embeds]
            assert all(torch.equal(c, e[:, :-CHANNELS]) for c, e in zip(cleaned, embeds))
        computed[live] += scheduled
    return rope


@pytest.mark.parametrize("chunk", [1, 4, 9, 1000])
def test_v2_pruner_gives_transformers_positions_for_every_chunking_and_prefix_cache_start(cases, chunk):
    config, cases = cases
    longest = max(len(c["ids"]) for c in cases)
    for cached in [*range(0, 45), *range(300, longest)]:   # the short prompts, the long one's images
        rope = _schedule(cases, config, chunk, cached)
        for r, case in enumerate(cases):
            n = len(case["ids"])
            want = torch.tensor(case["want"]["positions"][-3:])
            start = min(cached, n - 1)
            got = rope.read_prefill_positions(r, n)
            assert torch.equal(got[:, start:].long(), want[:, start:]), (r, chunk, cached)
            assert rope.prefill_delta.np[r] == int(want.max()) + 1 - n
