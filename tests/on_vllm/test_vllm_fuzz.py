"""The differential fuzzer (``fuzz.py``) on a fixed set of seeds: each a random request (family,
method, keep, image sizes above Qwen's default max_pixels, images and videos, text around them,
the chat template with and without a system prompt, turns, chunked prefill and prefix-cache hits)
run in vLLM and in transformers with apply_desap; the engine must stay up, answer or refuse
cleanly, and give every item the text tokens, kept tokens and positions transformers gives it.

The cases run on engines other tests start anyway (``fuzz.ENGINES``), grouped by engine. Other
seeds: ``DESAP_FUZZ_SEEDS=200 DESAP_FUZZ_START=1000`` (or ``python tests/on_vllm/fuzz.py --seeds
200 --start 1000``); a failure prints its seed and the command that replays it."""
import os
import sys

import pytest

import fuzz

# chosen to cover every engine of fuzz.ENGINES, every family's images, Qwen videos (Qwen3-VL's
# timestamps among them), max_pixels above the default, keep 1, a refused keep, turns and follow-ups
CI_SEEDS = (5, 7, 9, 11)


def _seeds() -> list:
    if "DESAP_FUZZ_SEEDS" in os.environ:
        start = int(os.environ.get("DESAP_FUZZ_START", "0"))
        return list(range(start, start + int(os.environ["DESAP_FUZZ_SEEDS"])))
    return list(CI_SEEDS)


# grouped by engine, so each engine serves its cases in a row
CASES = {case.seed: case for case in sorted(map(fuzz.generate, _seeds()),
                                            key=lambda c: (list(fuzz.ENGINES).index(c.engine), c.seed))}
# the engine each case runs on (conftest.py starts them ahead)
ENGINES = {"test_the_engine_agrees_with_apply_desap_on_a_random_request":
           lambda seed: [(CASES[seed].family, CASES[seed].settings)]}


@pytest.mark.parametrize("seed", list(CASES))
def test_the_engine_agrees_with_apply_desap_on_a_random_request(seed, checkpoints, tmp_path):
    outcome = fuzz.run_case(CASES[seed], checkpoints, tmp_path)
    assert not outcome.findings, fuzz.report(outcome, sys.executable)
