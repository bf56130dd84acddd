"""The ``desap`` command line on CPU: demo, bench op, bench e2e, and the errors a person can fix."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from desap_ops import demo as demo_module
from desap_ops.__main__ import main


def _run(*args):
    """The CLI in a fresh process, as a person runs it."""
    return subprocess.run([sys.executable, "-m", "desap_ops", *args], capture_output=True, text=True, timeout=600)


def test_demo_default_draws_real_saliency_on_a_real_photo(tmp_path):
    out = tmp_path / "kept.png"
    run = _run("demo", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "real: ViT-S/14 weights" in run.stdout and "stand-in:" in run.stdout
    assert "kept 32 of 256 tokens" in run.stdout
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1500, 540)


def test_demo_keeps_what_the_operator_keeps(tmp_path):
    picture, _ = demo_module.load_image(None)
    result = demo_module.run_vit(picture, 24, 0.5, (360, 10, 460, 270), None)
    assert result.indices.numel() == 24 and result.grid == 16
    assert (result.indices[1:] > result.indices[:-1]).all()
    assert 0 < float(result.saliency.sum()) <= 1 + 1e-6          # [CLS] also attends to itself
    top_salient = result.saliency.topk(12).indices                # K_sal = 24 - round(0.5 * 24)
    assert torch.isin(top_salient, result.indices).all()
    box_cells = demo_module.box_tokens((360, 10, 460, 270), 512, 512, 16)
    assert torch.isin(result.indices, box_cells).any(), "the exemplar box should draw task tokens"


def test_real_vit_saliency_matches_its_eager_attention_matrix():
    """[CLS] saliency recomputed from queries and keys equals the eager attention matrix's [CLS] row
    on the real ViT-S/14 and a real photograph."""
    from desap_ops import vit_s
    from desap_ops.integrations.signals import capture

    picture, _ = demo_module.load_image(None)
    pixels = vit_s.preprocess(picture)
    model = vit_s.load_vit_s(attn_implementation="eager")
    for layer in (5, demo_module.FEATURE_LAYER):
        with torch.no_grad(), capture(vit_s.dinov2_layout(model, layer)) as signals:
            out = model(pixels, output_attentions=True)
            saliency = signals.cls_saliency()
        torch.testing.assert_close(saliency, out.attentions[layer][:, :, 0, :].mean(dim=1), rtol=1e-4, atol=1e-6)


def _tiny_checkpoint(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from desap_ops.integrations.tiny import tiny_llava

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 100}
    vocab.update({f"w{i}": i for i in range(4, 100)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    tiny_llava().save_pretrained(folder)


def test_demo_with_a_local_llava_checkpoint(tmp_path):
    _tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "kept.png"
    run = _run("demo", "--model", str(tmp_path / "tiny"), "--prompt", "w5 w6 w7", "--keep", "4",
               "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kept 4 of 16 tokens" in run.stdout
    with Image.open(out) as image:
        assert image.size == (1500, 540)


@pytest.mark.parametrize("args,message", [
    (["demo", "--image", "/no/such/file.png"], "no such image file"),
    (["demo", "--keep", "1000"], "--keep must lie in [1, 256]"),
    (["demo", "--query-box", "1,2,3"], "--query-box must be x0,y0,x1,y1"),
    (["demo", "--model", "/no/such/folder"], "local checkpoint folder"),
    (["bench", "e2e", "--model", "tiny", "--keep", "99"], "--keep values must lie in [1, 16]"),
    (["bench", "e2e", "--model", "tiny", "--keep", "a,b"], "comma-separated integers"),
])
def test_errors_a_person_can_fix_exit_2_without_a_traceback(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    errors = [line for line in err.strip().splitlines() if not line.startswith("... ")]  # not progress
    assert len(errors) == 1 and errors[0].startswith("desap: error: ")


def test_an_image_that_is_not_an_image(tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    assert main(["demo", "--image", str(fake)]) == 2
    assert "is not an image" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("command", [["bench", "op"], ["bench", "e2e", "--device", "cuda"]])
def test_cuda_without_a_gpu_exits_2(capsys, command):
    assert main(command + ["--device", "cuda"] if command == ["bench", "op"] else command) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_op_on_cpu_writes_json(tmp_path):
    out = tmp_path / "op.json"
    assert main(["bench", "op", "--device", "cpu", "--tiny", "--no-compile", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["shape"]["name"] == "tiny" and saved["rows"][0]["eager_ms"] > 0


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
