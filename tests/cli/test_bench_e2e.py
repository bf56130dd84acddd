"""``desap bench e2e``: every model family through one run loop, JSON, plot, FLOPs on meta; the real
layouts at reduced size (buffers, forward, the ideal), the memory check, the table and the plot."""
import json

import pytest
import torch
import transformers
from PIL import Image

from desap_ops.cli import bench_e2e
from desap_ops.cli.main import main
from desap_ops.cli.models import CLASSES, MODELS, build_model, model_config
from desap_ops.cli.report import cpu_name

# every real layout family, at reduced depth and width: (name, a budget below its token count)
REAL_LAYOUTS = [("llava-1.5-7b", 64), ("llava-tinyllama-1.1b", 64), ("llava-next-7b", 640),
                ("qwen2.5-vl-7b", 64), ("qwen3-vl-8b", 64), ("llava-next-video-7b", 200), ("video-llava-7b", 300)]


def test_bench_e2e_tiny_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--model", "tiny", "--keep", "16,4", "--repeats", "2", "--out", str(out),
                 "--plot", str(plot)]) == 0
    saved = json.loads(out.read_text())
    assert [r["keep"] for r in saved["rows"]] == [16, 4]
    assert saved["repeats"] == 2 and saved["measured"] == "timed" and saved["weights"] == "random"
    for row in saved["rows"]:
        for field in ("full_ms", "desap_ms", "ideal_ms", "speedup", "ideal_speedup", "overhead_ms", "overhead_share",
                      "share_of_ideal_speedup"):
            assert field in row
        assert row["speedup"] == pytest.approx(row["full_ms"] / row["desap_ms"])
        assert row["share_of_ideal_speedup"] == pytest.approx(row["ideal_ms"] / row["desap_ms"])
        assert row["flops"]["desap"] > row["flops"]["ideal"] > 0
    with Image.open(plot) as image:
        assert image.format == "PNG"


def test_timed_table_names_the_device_once_and_the_processor(tmp_path):
    result = bench_e2e.run("tiny", [16, 4], "cpu", repeats=1)
    header, note = bench_e2e.format_table(result).splitlines()[:2]
    assert header.startswith("tiny, random weights, timed on cpu (")
    assert f"timed on cpu ({cpu_name()}, {torch.get_num_threads()} threads)" in header
    assert header.count("on cpu") == 1 and "cpu cpu" not in header
    assert "medians of 1 round after 1 warm-up" in note and "vision tower alone" in note
    figure = bench_e2e.figure(result)
    ax = figure.axes[0]
    assert ax.get_ylabel() == "full model / DeSAP or ideal (x)"
    assert ax.get_xlabel() == "image tokens kept (of 16)"
    assert "timed on cpu" in ax.get_title() and "random weights" in ax.get_title()
    assert [line.get_label() for line in ax.get_lines()] == ["DeSAP speedup (timed)",
                                                             "ideal speedup (no pruning work)",
                                                             "FLOP reduction (counted)"]


def test_bench_e2e_counts_full_size_flops_on_meta(tmp_path, capsys):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "meta", "--keep", "576,64",
                 "--out", str(out), "--plot", str(plot)]) == 0
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert rows[0]["flops"]["full"] > 8e12      # CLIP ViT-L/14-336 + a 7B language model over ~600 tokens
    assert rows[1]["flops_reduction"] > 4
    assert "full_ms" not in rows[0] and saved["measured"] == "FLOPs counted"
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("llava-1.5-7b, random weights, FLOPs counted on meta, bf16")
    assert "timed" not in header and cpu_name() not in header
    ax = bench_e2e.figure(saved).axes[0]
    assert ax.get_ylabel() == "FLOPs, full model / DeSAP (x)"
    assert "FLOPs counted on meta" in ax.get_title()

    # the vision tower's share of the pruned prefill grows as the language model shrinks
    tower_share = lambda row: row["flops"]["vision_tower"] / row["flops"]["desap"]  # noqa: E731
    smaller = [bench_e2e.run(name, [64], "meta")["rows"][0] for name in ("llava-tinyllama-1.1b", "llava-qwen2-0.5b")]
    assert tower_share(rows[1]) < tower_share(smaller[0]) < tower_share(smaller[1])
    assert tower_share(smaller[1]) > 0.5     # at 64 of 576 the tower is most of a 0.5B-class model's prefill


@pytest.mark.parametrize("model,keeps", [("tiny-qwen2.5-vl", "16,4"), ("tiny-qwen3-vl", "16,4"),
                                         ("tiny-llava-next-video", "12,3"), ("tiny-video-llava", "51,10")])
def test_bench_e2e_qwen_and_video_models(tmp_path, model, keeps):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", model, "--keep", keeps, "--repeats", "1", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["model"] == model and [r["keep"] for r in saved["rows"]] == [int(k) for k in keeps.split(",")]
    for row in saved["rows"]:
        assert row["desap_ms"] > 0 and row["ideal_ms"] > 0 and "overhead_share" in row
    assert saved["rows"][1]["flops"]["desap"] < saved["rows"][0]["flops"]["desap"]


def test_meta_counts_the_qwen_forward_exactly_without_the_matrix_work(tmp_path, capsys):
    """--device meta for a model whose forward reads token ids: the real forward passes under
    ShapesOnly count what they count on the CPU, FLOP for FLOP."""
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", "tiny-qwen3-vl", "--device", "meta", "--keep", "16,4",
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["measured"] == "FLOPs counted" and saved["device"] == "meta" and "full_ms" not in saved["rows"][0]
    timed = bench_e2e.run("tiny-qwen3-vl", [16, 4], "cpu", repeats=1)
    assert [r["flops"] for r in saved["rows"]] == [r["flops"] for r in timed["rows"]]
    full, small = saved["rows"]
    assert full["flops"]["full"] > full["flops"]["vision_tower"] > 0
    assert full["flops"]["ideal"] == full["flops"]["full"] > small["flops"]["ideal"]
    table = capsys.readouterr().out
    assert "vision tower" in table and "LM FLOP x" not in table and "tower of desap" in table


def test_cpu_attention_is_counted_as_on_meta():
    """torch counts no FLOPs for SDPA's CPU kernel; the bench counts it as the meta path does."""
    q = torch.randn(1, 4, 128, 32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    on_meta = bench_e2e.flops_of(lambda: sdpa(*[q.to("meta")] * 3))
    assert on_meta == 2 * 2 * 4 * 128 * 128 * 32
    assert bench_e2e.flops_of(lambda: sdpa(q, q, q)) == on_meta
    assert bench_e2e.flops_of(lambda: sdpa(q, q, q), shapes_only=True) == on_meta


def test_qwen3_vl_8b_has_the_published_shape():
    model = build_model("qwen3-vl-8b", "meta", torch.bfloat16)
    assert 8.76e9 < sum(p.numel() for p in model.parameters()) < 8.78e9    # 8.77 billion parameters
    vision, text = model.config.vision_config, model.config.text_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.patch_size, vision.out_hidden_size) == \
        (27, 1152, 16, 16, 4096)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24] and len(model.model.visual.deepstack_merger_list) == 3
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.head_dim, text.vocab_size) == (4096, 36, 32, 8, 12288, 128, 151936)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["rope_theta"] == 5e6
    zero = build_model("qwen3-vl-8b", "cpu", torch.bfloat16, shrink=True, weights=False)
    assert all(p.stride() == (0,) * p.dim() and not p.any() for p in zero.parameters())


@pytest.mark.slow
def test_qwen3_vl_8b_counts_its_full_size_flops_on_meta():
    """The real shape, 1024 image tokens (1024 x 1024 pixels), counted in little memory: the tower
    (DeepStack mergers included) about 5.8 TFLOP whatever the budget, the prefill about 21 TFLOP."""
    result = bench_e2e.run("qwen3-vl-8b", [64], "meta")
    assert result["image_tokens"] == 1024 and not result["shrink"]
    flops = result["rows"][0]["flops"]
    assert 5.7e12 < flops["vision_tower"] < 5.9e12 and 2.1e13 < flops["full"] < 2.15e13
    assert flops["full"] > flops["desap"] > flops["ideal"] > flops["vision_tower"]
    assert flops["desap"] - flops["ideal"] < 0.02 * flops["desap"]    # saliency, merger on the branch, the op
    assert result["rows"][0]["flops_reduction"] > 2.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen3-vl-8b", "video-llava-7b"])
def test_meta_counts_equal_the_real_forward_counts_of_the_real_layouts(name):
    keeps = [64, 8]
    counted = bench_e2e.run(name, keeps, "meta", shrink=True)
    timed = bench_e2e.run(name, keeps, "cpu", repeats=1, shrink=True)
    assert [r["flops"] for r in counted["rows"]] == [r["flops"] for r in timed["rows"]]


def test_default_budgets_and_repeats():
    assert bench_e2e.default_keeps(576) == [576, 192, 128, 64]
    with pytest.raises(bench_e2e.UsageError, match="--repeats must be at least 1"):
        bench_e2e.run("tiny", None, "cpu", repeats=0)


def test_a_model_too_large_for_the_memory_is_refused_before_building(monkeypatch, capsys):
    build = bench_e2e.build_model

    def meta_only(name, device, *args, **kwargs):   # the estimate builds on meta, allocating nothing
        assert device == "meta", "the model was built"
        return build(name, device, *args, **kwargs)

    monkeypatch.setattr(bench_e2e, "available_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(bench_e2e, "build_model", meta_only)
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("... ")]
    assert len(err) == 1 and err[0].startswith("desap: error: llava-1.5-7b in fp32 needs about ")
    assert "13.2 GiB of weights" not in err[0] and "26.3 GiB of weights" in err[0]
    assert "only 8.0 GiB is available" in err[0] and "--device meta" in err[0]


def test_the_memory_estimate_counts_the_weights():
    weights, needed = bench_e2e.needed_bytes("llava-1.5-7b", torch.bfloat16)
    assert 7.0e9 * 2 < weights < 7.1e9 * 2            # LLaVA-1.5-7B: 7.06 billion parameters in bf16
    assert needed == int(weights * 1.25) + 2**30
    assert bench_e2e.available_bytes("cpu") > 0


@pytest.mark.slow
@pytest.mark.parametrize("name,keep", REAL_LAYOUTS)
def test_real_layouts_build_with_the_constructors_buffers_and_run(name, keep):
    model = build_model(name, "cpu", torch.float32, shrink=True)
    reference = getattr(transformers, CLASSES[MODELS[name].family])(model_config(name, shrink=True))
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys() and buffers
    for key, buffer in buffers.items():
        assert buffer.dtype == expected[key].dtype and torch.equal(buffer, expected[key]), key
    stds = [p.std().item() for p in model.parameters() if p.numel() > 1]
    assert min(stds) > 0.015 and max(stds) < 0.025      # every parameter drawn from N(0, 0.02)

    result = bench_e2e.run(name, [keep], "cpu", repeats=1, shrink=True)
    row = result["rows"][0]
    assert row["full_ms"] > 0 and row["desap_ms"] > 0 and row["ideal_ms"] > 0
    # at reduced width the language model saves little, so DeSAP's own work may outweigh it (Qwen2.5-VL)
    assert row["flops"]["full"] > row["flops"]["ideal"] > 0 and row["flops"]["desap"] > row["flops"]["ideal"]


@pytest.mark.parametrize("name,keep", REAL_LAYOUTS)
def test_the_ideal_feeds_the_first_k_tokens_projecting_only_those(name, keep):
    """The language model gets the full prompt with the image's tokens cut to their first K, and
    (LLaVA layouts) the projector runs on those K tokens only, never on all N."""
    model = build_model(name, "cpu", torch.float32, shrink=True)
    data = bench_e2e.make_batch(model, name, 1, "cpu", torch.float32)
    family, inner, n = MODELS[name].family, model.model, data.tokens
    embeds, projected = [], []
    inner.language_model.register_forward_pre_hook(lambda m, a, k: embeds.append(k["inputs_embeds"]),
                                                   with_kwargs=True)
    levels = []
    if family == "qwen3_vl":
        inner.language_model.register_forward_pre_hook(
            lambda m, a, k: levels.append(k["deepstack_visual_embeds"]), with_kwargs=True)
    if family not in bench_e2e.QWEN:   # the Qwen projector is the merger inside its encoder
        inner.multi_modal_projector.register_forward_hook(lambda m, a, o: projected.append(a[0].shape[:-1].numel()))
    with torch.no_grad():
        model(**data.inputs, logits_to_keep=1)
        with bench_e2e.ideal_inputs(model, family, data, keep) as short:
            model(**short, logits_to_keep=1)
    full, ideal = embeds
    placeholders = (data.inputs["input_ids"][0] == data.token_id).nonzero()[:, 0]
    first = int(placeholders[0])
    assert ideal.shape[1] == full.shape[1] - n + keep
    torch.testing.assert_close(ideal, torch.cat([full[:, :first + keep], full[:, first + n:]], dim=1))
    if family == "llava_next":
        # 576 base tokens, then the grid's first row (48 tokens and its newline), then 15 more tokens
        assert projected == [5 * 576, keep - 1]
    elif family not in bench_e2e.QWEN:
        assert projected[1:] == [keep] and projected[0] >= n
    if family == "qwen3_vl":   # every DeepStack level cut to its first K tokens too
        assert len(levels[0]) == len(levels[1]) == 2
        for full_level, ideal_level in zip(*levels):
            assert full_level.shape[0] == n
            torch.testing.assert_close(ideal_level, full_level[:keep])
