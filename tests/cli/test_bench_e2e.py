"""``desap bench e2e``: every model family through one run loop, JSON, plot, FLOPs on meta."""
import json

import pytest
from PIL import Image

from desap_ops.cli.main import main


def test_bench_e2e_tiny_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--model", "tiny", "--keep", "16,4", "--out", str(out), "--plot", str(plot)]) == 0
    saved = json.loads(out.read_text())
    assert [r["keep"] for r in saved["rows"]] == [16, 4]
    for row in saved["rows"]:
        for field in ("full_ms", "desap_ms", "ideal_ms", "speedup", "ideal_speedup", "overhead_ms", "overhead_share"):
            assert field in row
        assert row["flops"]["desap"] > row["flops"]["ideal"] > 0
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_bench_e2e_counts_full_size_flops_on_meta(tmp_path):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "meta", "--keep", "576,64",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["flops"]["full"] > 8e12      # CLIP ViT-L/14-336 + a 7B language model over ~600 tokens
    assert rows[1]["flops_reduction"] > 4


@pytest.mark.parametrize("model,keeps", [("tiny-qwen2.5-vl", "16,4"), ("tiny-llava-next-video", "12,3"),
                                         ("tiny-video-llava", "51,10")])
def test_bench_e2e_qwen_and_video_models(tmp_path, model, keeps):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", model, "--keep", keeps, "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["model"] == model and [r["keep"] for r in saved["rows"]] == [int(k) for k in keeps.split(",")]
    for row in saved["rows"]:
        assert row["desap_ms"] > 0 and row["ideal_ms"] > 0 and "overhead_share" in row
    assert saved["rows"][1]["flops"]["desap"] < saved["rows"][0]["flops"]["desap"]


def test_bench_e2e_meta_is_for_the_llava_shapes(capsys):
    assert main(["bench", "e2e", "--model", "qwen2.5-vl-7b", "--device", "meta"]) == 2
    assert "--device cpu or cuda" in capsys.readouterr().err
