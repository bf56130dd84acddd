"""The differential fuzzer (``fuzz.py``) on Qwen3-VL: a fixed set of seeds, each a random
request run in vLLM and in transformers with apply_desap; the engine must stay up, answer or refuse
cleanly, and give every item the text tokens, kept tokens and positions transformers gives it. The
cases run on the engines that test_vllm_qwen3_vl.py starts too (this file's name sorts it right
before them, so the pool's engines serve both). Other seeds: ``DESAP_FUZZ_SEEDS=200
DESAP_FUZZ_START=1000``, or ``python tests/on_vllm/fuzz.py --seeds 200 --start 1000``."""
import pytest

import fuzz

# seeds that found issue 33's bugs and guard their fixes: 5 and 389 (a Qwen3-VL video's frame
# timestamps read as the user's words in transformers), 2732 (a 106 x 20000 image at max_pixels
# 4194304: its kept tokens' positions passed the 512-entry rotary cache, and the engine died)
CI_SEEDS = (5, 6, 10, 389, 408, 2732)
CASES = fuzz.test_cases(("qwen3_vl-batch", "qwen3_vl-chunked"), CI_SEEDS)
# the engine each case runs on (conftest.py starts them ahead)
ENGINES = {"test_the_engine_agrees_with_apply_desap_on_a_random_request":
           lambda seed: [(CASES[seed].family, CASES[seed].settings)]}


@pytest.mark.parametrize("seed", list(CASES))
def test_the_engine_agrees_with_apply_desap_on_a_random_request(seed, checkpoints, tmp_path):
    fuzz.assert_case(CASES[seed], checkpoints, tmp_path)
