"""The V2 runners' wiring rules (``hooks.V2_WIRING``, ``V2_CPU_WIRING``, ``CPU_PLATFORM``,
``BINDINGS``) and the pinned V2 modules (``pins``), through ``release_check`` on a made-up release
laid out as 0.34 (both V2 runners): it holds every rule, and each case breaks exactly one, which
``check_release`` then names. In the slow stage, every supported release's real wheel holds them
all, pins included. Runs without vLLM installed."""
import textwrap
from pathlib import Path

import pytest

from desap_ops.integrations.common.hooked import Hook
from desap_ops.integrations.vllm.hooks import (BINDINGS, CPU_PLATFORM, GROUPS, SUPPORTED_VLLM, V2_CPU_WIRING,
                                              V2_WIRING, Found, wiring_problem)
from desap_ops.integrations.vllm.pins import PINNED_SHA256, file_sha256, module_path
from desap_ops.integrations.vllm.release_check import check_release, release_sources

WIRING = (V2_WIRING, V2_CPU_WIRING, CPU_PLATFORM)
_GPU, _CPU = "vllm/v1/worker/gpu/", "vllm/v1/worker/cpu/"
RELEASE = {
    "vllm/__init__.py": "",
    "vllm/platforms/__init__.py": """
        def __getattr__(name):
            if name == "current_platform":
                return _current_platform
            raise AttributeError(name)
        """,
    "vllm/platforms/interface.py": """
        class Platform:
            def is_cpu(self):
                return self._enum == "cpu"
        """,
    _GPU + "model_states/mm_pruning.py": """
        def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
            return None
        """,
    _GPU + "model_states/default.py": """
        from vllm.v1.worker.gpu.mm.rope import get_rope_state
        from vllm.v1.worker.gpu.model_states.mm_pruning import maybe_create_mm_pruner

        class DefaultModelState:
            def __init__(self, vllm_config, model, encoder_cache, device):
                self.rope_state = get_rope_state(vllm_config, model)
                self.mm_pruner = maybe_create_mm_pruner(self.model_config, model, self.rope_state, encoder_cache)

            def apply_staged_writes(self):
                if self.rope_state is not None:
                    self.rope_state.apply_staged_writes()

            def prepare_inputs_embeds(self, scheduled_encoder_inputs, input_batch, req_states):
                mm_embeds, is_mm_embed = super().gather_mm_embeddings(input_batch)
                if self.mm_pruner is not None and mm_embeds:
                    mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)
                    self.apply_staged_writes()
                return self.encoder_runner.get_inputs_embeds(input_batch.input_ids, mm_embeds, is_mm_embed)

            def prepare_inputs(self, input_batch, req_states):
                self.rope_state.prepare_positions(input_batch.idx_mapping)
                return {"positions": self.rope_state.get_positions(input_batch.num_tokens)}
        """,
    _GPU + "mm/rope.py": """
        class RopeState:
            def init_prefill_positions(self, req_idx, model, prefill_token_ids, mm_features):
                positions, delta = model.get_mrope_input_positions(prefill_token_ids, mm_features)
                for i in range(self.num_dims):
                    self.prefill_positions.stage_write(self.num_dims * req_idx + i, 0, positions[i].numpy())
        """,
    _GPU + "model_runner.py": """
        class GPUModelRunner:
            def add_requests(self, scheduler_output):
                for new_req_data in scheduler_output.scheduled_new_reqs:
                    self.model_state.add_request(0, new_req_data)
                self.model_state.apply_staged_writes()

            def execute_model(self, scheduler_output):
                self.add_requests(scheduler_output)
                input_batch = self.prepare_inputs(scheduler_output)
                inputs_embeds = self.model_state.prepare_inputs_embeds({}, input_batch, self.req_states)
                model_inputs = {"inputs_embeds": inputs_embeds,
                                **self.model_state.prepare_inputs(input_batch, self.req_states)}
                return self.model(**model_inputs)
        """,
    _CPU + "mm_pruning.py": """
        def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
            return None
        """,
    _CPU + "model_states/default.py": """
        from vllm.v1.worker.cpu.mm_pruning import maybe_create_mm_pruner

        class DefaultModelState:
            def __init__(self, vllm_config, model, encoder_cache, device):
                self.mm_pruner = maybe_create_mm_pruner(self.model_config, model, self.rope_state, encoder_cache)

            def prepare_inputs_embeds(self, scheduled_encoder_inputs, input_batch, req_states):
                mm_embeds, is_mm_embed = super().gather_mm_embeddings(input_batch)
                if self.mm_pruner is not None and mm_embeds:
                    mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)
                return self.encoder_runner.get_inputs_embeds(input_batch.input_ids, mm_embeds, is_mm_embed)

            def prepare_inputs(self, input_batch, req_states):
                self.rope_state.prepare_positions(input_batch.idx_mapping)
                return {"positions": self.rope_state.get_positions(input_batch.num_tokens)}
        """,
    _CPU + "rope.py": """
        class RopeState:
            def init_prefill_positions(self, req_idx, model, prefill_token_ids, mm_features):
                positions, delta = model.get_mrope_input_positions(prefill_token_ids, mm_features)
                self.prefill_positions[req_idx].copy_(positions[0])
        """,
    _CPU + "standalone_model_runner.py": """
        class StandaloneCPUModelRunner:
            def execute_model(self, scheduler_output):
                input_batch = self.prepare_inputs(scheduler_output)
                inputs_embeds = self.model_state.prepare_inputs_embeds({}, input_batch, self.req_states)
                return self.model(inputs_embeds=inputs_embeds,
                                  **self.model_state.prepare_inputs(input_batch, self.req_states))
        """,
    _GPU + "spec_decode/eagle.py": """
        import torch
        """,
}
_STATE, _CPU_STATE = "gpu.model_states.default:DefaultModelState", "cpu.model_states.default:DefaultModelState"
_W = "vllm.v1.worker."
# (file, text replaced, by what, what check_release must then say): one rule broken in each
BROKEN = {
    "the factory looked up through its module": (
        _GPU + "model_states/default.py", "self.mm_pruner = maybe_create_mm_pruner(",
        "self.mm_pruner = mm_pruning.maybe_create_mm_pruner(",
        f"{_W}{_STATE}.__init__ no longer looks up maybe_create_mm_pruner in its module's globals"),
    "the factory imported under another name": (
        _GPU + "model_states/default.py", "import maybe_create_mm_pruner\n",
        "import maybe_create_mm_pruner as create_pruner\n",
        f"{_W}gpu.model_states.default no longer binds maybe_create_mm_pruner, which {_W}{_STATE}.__init__ looks up"),
    "the factory imported inside __init__": (
        _GPU + "model_states/default.py", "self.rope_state = get_rope_state(vllm_config, model)",
        "from vllm.v1.worker.gpu.model_states.mm_pruning import maybe_create_mm_pruner\n"
        "        self.rope_state = get_rope_state(vllm_config, model)",
        f"{_W}{_STATE}.__init__ binds maybe_create_mm_pruner itself"),
    "the model state moved to another module": (
        _GPU + "model_states/default.py", "class DefaultModelState:",
        "from vllm.v1.worker.gpu.model_states.base import DefaultModelState\n\nclass Unused:",
        f"{_W}{_STATE}.__init__ is now defined in vllm.v1.worker.gpu.model_states.base"),
    "the staged writes flushed before the pruner": (
        _GPU + "model_states/default.py",
        "mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)\n"
        "            self.apply_staged_writes()",
        "self.apply_staged_writes()\n"
        "            mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)",
        f"{_W}{_STATE}.prepare_inputs_embeds now uses apply_staged_writes before mm_pruner.recompute"),
    "the pruner no longer called": (
        _GPU + "model_states/default.py", "mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)",
        "pass", f"{_W}{_STATE}.prepare_inputs_embeds no longer calls mm_pruner.recompute"),
    "the staged writes no longer flushed": (
        _GPU + "model_states/default.py", "            self.apply_staged_writes()\n", "",
        f"{_W}{_STATE}.prepare_inputs_embeds no longer calls apply_staged_writes"),
    "the rope state no longer flushed": (
        _GPU + "model_states/default.py", "self.rope_state.apply_staged_writes()", "pass",
        f"{_W}{_STATE}.apply_staged_writes no longer calls rope_state.apply_staged_writes"),
    "the forward's positions no longer prepared by the rope state": (
        _GPU + "model_states/default.py", "self.rope_state.prepare_positions(input_batch.idx_mapping)\n", "\n",
        f"{_W}{_STATE}.prepare_inputs no longer calls rope_state.prepare_positions"),
    "the positions no longer from the model": (
        _GPU + "mm/rope.py", "model.get_mrope_input_positions(", "model.get_input_positions(",
        f"{_W}gpu.mm.rope:RopeState.init_prefill_positions no longer calls get_mrope_input_positions"),
    "a request's positions flushed before they are staged": (
        _GPU + "model_runner.py",
        "self.model_state.add_request(0, new_req_data)\n        self.model_state.apply_staged_writes()",
        "self.model_state.apply_staged_writes()\n        self.model_state.add_request(0, new_req_data)",
        f"{_W}gpu.model_runner:GPUModelRunner.add_requests now uses model_state.apply_staged_writes before "
        "model_state.add_request"),
    "the forward's positions prepared before the embeddings": (
        _GPU + "model_runner.py", "inputs_embeds = self.model_state.prepare_inputs_embeds(",
        "early = self.model_state.prepare_inputs(input_batch, self.req_states)\n"
        "        inputs_embeds = self.model_state.prepare_inputs_embeds(",
        f"{_W}gpu.model_runner:GPUModelRunner.execute_model now uses model_state.prepare_inputs before "
        "model_state.prepare_inputs_embeds"),
    "the CPU factory looked up through its module": (
        _CPU + "model_states/default.py", "self.mm_pruner = maybe_create_mm_pruner(",
        "self.mm_pruner = mm_pruning.maybe_create_mm_pruner(",
        f"{_W}{_CPU_STATE}.__init__ no longer looks up maybe_create_mm_pruner in its module's globals"),
    "the CPU pruner no longer called": (
        _CPU + "model_states/default.py", "mm_embeds = self.mm_pruner.recompute(mm_embeds, input_batch, req_states)",
        "pass", f"{_W}{_CPU_STATE}.prepare_inputs_embeds no longer calls mm_pruner.recompute"),
    "the CPU forward's positions no longer prepared": (
        _CPU + "model_states/default.py", "self.rope_state.prepare_positions(input_batch.idx_mapping)\n", "\n",
        f"{_W}{_CPU_STATE}.prepare_inputs no longer calls rope_state.prepare_positions"),
    "the CPU positions no longer from the model": (
        _CPU + "rope.py", "model.get_mrope_input_positions(", "model.get_input_positions(",
        f"{_W}cpu.rope:RopeState.init_prefill_positions no longer calls get_mrope_input_positions"),
    "the CPU forward's positions prepared before the embeddings": (
        _CPU + "standalone_model_runner.py", "inputs_embeds = self.model_state.prepare_inputs_embeds(",
        "early = self.model_state.prepare_inputs(input_batch, self.req_states)\n"
        "        inputs_embeds = self.model_state.prepare_inputs_embeds(",
        f"{_W}cpu.standalone_model_runner:StandaloneCPUModelRunner.execute_model now uses "
        "model_state.prepare_inputs before model_state.prepare_inputs_embeds"),
    "the platform's CPU check gone": (
        "vllm/platforms/interface.py", "def is_cpu(self):", "def is_host(self):",
        "vllm.platforms.interface:Platform.is_cpu is missing"),
    "the current platform no longer a lazy module attribute": (
        "vllm/platforms/__init__.py", 'if name == "current_platform":', 'if name == "platform":',
        "vllm.platforms:__getattr__ no longer uses \"current_platform\""),
    "another module imports the factory": (
        _GPU + "spec_decode/eagle.py", "import torch",
        "from vllm.v1.worker.gpu.model_states.default import maybe_create_mm_pruner",
        "vllm.v1.worker.gpu.spec_decode.eagle (line 2) binds maybe_create_mm_pruner"),
    "another module imports the factory under another name": (
        _GPU + "spec_decode/eagle.py", "import torch",
        "from vllm.v1.worker.gpu.model_states.mm_pruning import maybe_create_mm_pruner as create",
        "vllm.v1.worker.gpu.spec_decode.eagle (line 2) binds maybe_create_mm_pruner"),
    "another module reads the factory off its module": (
        _GPU + "spec_decode/eagle.py", "import torch",
        "from vllm.v1.worker.gpu.model_states import mm_pruning\nbuild = mm_pruning.maybe_create_mm_pruner",
        "vllm.v1.worker.gpu.spec_decode.eagle (line 3) binds maybe_create_mm_pruner"),
    "another module star-imports the factory's module": (
        _GPU + "spec_decode/eagle.py", "import torch", "from ..model_states.mm_pruning import *",
        "vllm.v1.worker.gpu.spec_decode.eagle (line 2) binds maybe_create_mm_pruner"),
}


# files a case adds beside the one it breaks, and what else it breaks: a model state moved to another
# module takes the factory's import with it, which the binding rule refuses too
ADDED = {"the model state moved to another module": {
    _GPU + "model_states/base.py": RELEASE[_GPU + "model_states/default.py"]}}
ALSO = {"the model state moved to another module": ["vllm.v1.worker.gpu.model_states.base (line 3) binds "
                                                    "maybe_create_mm_pruner"]}


def _release(root: Path, broken: tuple = None, added: dict = None) -> Path:
    for name, text in {**RELEASE, **(added or {})}.items():
        text = textwrap.dedent(text)
        if broken is not None and broken[0] == name:
            assert broken[1] in text, broken[1]
            text = text.replace(broken[1], broken[2])
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _check(root: Path) -> list[str]:
    return check_release(root, WIRING, BINDINGS, architectures=())


def test_the_made_up_release_holds_every_wiring_rule(tmp_path):
    assert _check(_release(tmp_path)) == []
    assert all(group in GROUPS for group in WIRING)   # the very groups start-up and release_check apply


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_release_check_names_each_broken_wiring_rule(tmp_path, case):
    found = _check(_release(tmp_path, BROKEN[case], ADDED.get(case)))
    want = [BROKEN[case][3], *ALSO.get(case, ())]
    assert len(found) == len(want) and all(line.startswith(w) for line, w in zip(found, want)), found


def test_order_is_by_first_use_and_names_match_on_whole_components():
    def found(body: str) -> Found:
        return Found(None, lambda: textwrap.dedent(body), "m")

    hook = Hook("m:f", calls_in_order=("model_state.prepare_inputs_embeds", "model_state.prepare_inputs"))
    # the runner's own prepare_inputs (self.prepare_inputs) is not the model state's
    assert wiring_problem(hook, found("""
        def f(self):
            self.prepare_inputs()
            self.model_state.prepare_inputs_embeds()
            self.model_state.prepare_inputs()
        """)) is None
    assert wiring_problem(hook, found("""
        def f(self):
            self.model_state.prepare_inputs_embeds_later()
            self.model_state.prepare_inputs()
        """)) == "m:f no longer calls model_state.prepare_inputs_embeds"
    assert wiring_problem(hook, found("def f(self):\n    return (")) == (
        "m:f: its source, whose wiring the plugin relies on, cannot be read as a function")


def test_a_pinned_module_changed_or_unpinned_fails_the_release(tmp_path):
    """A release that names a supported version must ship the reviewed bytes of each pinned module."""
    root = _release(tmp_path)
    (root / "vllm" / "_version.py").write_text("__version__ = version = '0.34.0'\n")
    found = _check(root)
    # the made-up files are not 0.34's: each one pinned that exists differs, the others are missing
    for module in PINNED_SHA256:
        want = (f"{module} is not the file reviewed for vLLM 0.34.0" if (root / module_path(module)).is_file()
                else f"{module} is missing in vLLM 0.34.0")
        assert sum(line.startswith(want) for line in found) == 1, (module, found)
    assert len(found) == len(PINNED_SHA256)
    (root / "vllm" / "_version.py").write_text("__version__ = version = '0.99.0'\n")
    assert _check(root) == [f"vLLM 0.99.0 has no pinned V2 modules: review {', '.join(PINNED_SHA256)} and pin them"]


def test_a_pinned_file_of_the_reviewed_bytes_passes(tmp_path):
    root = _release(tmp_path)
    (root / "vllm" / "_version.py").write_text("__version__ = version = '0.32.0'\n")
    rope = root / module_path("vllm.v1.worker.gpu.mm.rope")
    assert PINNED_SHA256["vllm.v1.worker.gpu.mm.rope"]["0.32.0"] != file_sha256(rope.read_bytes())
    found = _check(root)
    assert any(line.startswith("vllm.v1.worker.gpu.mm.rope is not the file reviewed for vLLM 0.32.0") for line in found)
    # a CPU runner module 0.32 does not have, here present: it needs a review and a pin
    assert any(line.startswith("vllm.v1.worker.cpu.rope exists in vLLM 0.32.0 but is not pinned") for line in found)


@pytest.mark.slow
@pytest.mark.parametrize("version", SUPPORTED_VLLM)
def test_every_supported_release_ships_the_pinned_v2_modules_and_holds_the_wiring(version):
    root = release_sources(version)
    assert check_release(root, WIRING, BINDINGS, architectures=()) == []
    for module, pins in PINNED_SHA256.items():   # the pins are these files' (check_release read them)
        path = root / module_path(module)
        assert (file_sha256(path.read_bytes()) if path.is_file() else None) == pins.get(version), module


@pytest.mark.slow
def test_byte_identical_v2_modules_across_the_supported_releases():
    """The facts docs/vllm.md states, read from the wheels."""
    def same(module: str) -> list[str]:
        hashes = {v: file_sha256((release_sources(v) / module_path(module)).read_bytes()) for v in SUPPORTED_VLLM}
        return sorted(v for v in SUPPORTED_VLLM if hashes[v] == hashes["0.34.0"])

    assert same("vllm.v1.worker.gpu.mm.encoder_runner") == ["0.32.0", "0.33.0", "0.34.0"]
    assert same("vllm.v1.worker.gpu.model_states.mm_pruning") == ["0.32.0", "0.33.0", "0.34.0"]
    assert same("vllm.v1.worker.gpu.mm.encoder_cache") == ["0.33.0", "0.34.0"]
    for module in ("vllm.v1.worker.gpu.mm.rope", "vllm.v1.worker.gpu.model_states.default",
                   "vllm.v1.worker.gpu.buffer_utils"):
        assert same(module) == ["0.34.0"], module
