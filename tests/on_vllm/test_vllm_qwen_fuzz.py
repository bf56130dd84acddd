"""The differential fuzzer (``fuzz.py``) on Qwen2.5-VL: a fixed set of seeds, each a random
request run in vLLM and in transformers with apply_desap; the engine must stay up, answer or refuse
cleanly, and give every item the text tokens, kept tokens and positions transformers gives it. The
cases run on the engines that test_vllm_qwen_sweep.py, test_vllm_qwen_video.py and
test_vllm_small_images.py start too (this file's name sorts it right
before them, so the pool's engines serve both). Other seeds: ``DESAP_FUZZ_SEEDS=200
DESAP_FUZZ_START=1000``, or ``python tests/on_vllm/fuzz.py --seeds 200 --start 1000``."""
import pytest

import fuzz

CI_SEEDS = (0, 7, 11, 71, 80, 186, 352)
CASES = fuzz.test_cases(("qwen2_5_vl-batch", "qwen2_5_vl-chunked"), CI_SEEDS)
# the engine each case runs on (conftest.py starts them ahead)
ENGINES = {"test_the_engine_agrees_with_apply_desap_on_a_random_request":
           lambda seed: [(CASES[seed].family, CASES[seed].settings)]}


@pytest.mark.parametrize("seed", list(CASES))
def test_the_engine_agrees_with_apply_desap_on_a_random_request(seed, checkpoints, tmp_path):
    fuzz.assert_case(CASES[seed], checkpoints, tmp_path)
