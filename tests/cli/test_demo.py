"""``desap demo``: the real ViT-S/14 on a real photograph, and a local LLaVA checkpoint."""
import subprocess
import sys

import torch
from PIL import Image

from desap_ops.cli import demo as demo_module
from desap_ops.cli import vit_s
from desap_ops.integrations.signals import capture


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

    from desap_ops.cli.models import tiny_llava

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
