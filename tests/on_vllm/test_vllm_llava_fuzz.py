"""The differential fuzzer (``fuzz.py``) on LLaVA-1.5 and LLaVA-NeXT: a fixed set of seeds, each a random
request run in vLLM and in transformers with apply_desap; the engine must stay up, answer or refuse
cleanly, and give every item the text tokens, kept tokens and positions transformers gives it. The
cases run on the engines that test_vllm_llava_sweep.py starts too (this file's name sorts it before
them, with test_vllm_llava_next.py's one engine between: the pool's engines serve both). Other
seeds: ``DESAP_FUZZ_SEEDS=200 DESAP_FUZZ_START=1000``, or ``python tests/on_vllm/fuzz.py --seeds 200 --start 1000``."""
import pytest

import fuzz

# 1771 (LLaVA-NeXT, keep 1, an image in each of two turns) found the second image reading the first
# turn's words in transformers (issue 33); it guards that fix
CI_SEEDS = (1, 2, 3, 8, 246, 259, 1771)
CASES = fuzz.test_cases(("llava-chunked", "llava_next-chunked"), CI_SEEDS)
# the engine each case runs on (conftest.py starts them ahead)
ENGINES = {"test_the_engine_agrees_with_apply_desap_on_a_random_request":
           lambda seed: [(CASES[seed].family, CASES[seed].settings)]}


@pytest.mark.parametrize("seed", list(CASES))
def test_the_engine_agrees_with_apply_desap_on_a_random_request(seed, checkpoints, tmp_path):
    fuzz.assert_case(CASES[seed], checkpoints, tmp_path)
