"""``desap bench e2e``: the prompts each variant feeds the language model, each time landing on its
variant, the rows covering the plan, FLOPs on meta equal to the real forward's, the ideal being
apply_desap's first K tokens with no pruning work, the memory refusal, and the command's JSON and plot."""
import json

import pytest
import torch
from PIL import Image

from desap_ops.benchmarks import e2e, machine
from desap_ops.benchmarks.flops import flops_of
from desap_ops.benchmarks.skeleton import from_json, to_json
from desap_ops.cli.errors import UsageError
from desap_ops.cli.main import main
from desap_ops.integrations.common.layout import packed_sources
from desap_ops.methods import available_methods
from desap_ops.testing.models import MODELS, build_model

# every real layout family, at reduced depth and width: (name, a budget below its token count)
REAL_LAYOUTS = [("llava-1.5-7b", 64), ("llava-tinyllama-1.1b", 64), ("llava-next-7b", 640),
                ("qwen2.5-vl-7b", 64), ("qwen3-vl-8b", 64), ("llava-next-video-7b", 200), ("video-llava-7b", 300)]
TINY = {"tiny": 16, "tiny-qwen2.5-vl": 16, "tiny-qwen3-vl": 16, "tiny-llava-next-video": 12, "tiny-video-llava": 51}


def _markers(name: str) -> int:
    """Tokens of a prompt that are neither text nor placeholders: BOS, and Qwen's vision start and end."""
    return 3 if MODELS[name].family in e2e.QWEN else 1


@pytest.fixture
def timed_by_length(monkeypatch):
    """Each prefill "takes" as many milliseconds as the language model got tokens, and the vision
    tower alone 0.5 ms: a time that lands on the wrong variant or round shows in the row."""
    lengths = []
    build = e2e.build_model

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.language_model.register_forward_pre_hook(
            lambda module, args_, kwargs_: lengths.append(kwargs_["inputs_embeds"].shape[1]), with_kwargs=True)
        return model

    def time_call_ms(fn, device):
        before = len(lengths)
        fn()
        return float(lengths[-1]) if len(lengths) > before else 0.5

    monkeypatch.setattr(e2e, "build_model", hooked)
    monkeypatch.setattr(e2e, "time_call_ms", time_call_ms)


@pytest.mark.parametrize("name", list(TINY))
def test_each_variant_feeds_its_prompt_and_its_time_lands_on_it(timed_by_length, name):
    """full: all N placeholders; DeSAP and the ideal: K of them, the text untouched. Every round's
    time of every budget is the one of its own variant, and the rows are the plan's budgets in order."""
    n, keeps = TINY[name], [TINY[name], 4]
    plan = e2e.make_plan(name, keeps, "cpu", repeats=2)
    assert plan.image_tokens == n
    result = e2e.run(plan)
    assert [row.keep for row in result.rows] == keeps and result.repeats == 2
    full_length = _markers(name) + n + e2e.TEXT_TOKENS
    for row in result.rows:
        pruned = full_length - n + row.keep
        assert row.rounds_ms.full == [full_length] * 2
        assert row.rounds_ms.desap == row.rounds_ms.ideal == [pruned] * 2
        assert (row.full_ms, row.desap_ms, row.ideal_ms) == (full_length, pruned, pruned)
    if MODELS[name].family in e2e.PIECEWISE:   # the tower alone, once a round, on its own
        assert result.vision_tower_rounds_ms == [0.5, 0.5]
    else:
        assert result.vision_tower_ms is None


@pytest.mark.parametrize("name", list(TINY))
def test_the_batch_holds_the_processors_placeholder_count(name):
    model = build_model(name, "cpu", torch.float32)
    data = e2e.make_batch(model, name, 2, "cpu", torch.float32)
    ids = data.inputs["input_ids"]
    assert ids.shape == (2, _markers(name) + TINY[name] + e2e.TEXT_TOKENS)
    assert ((ids == data.token_id).sum(1) == TINY[name]).all()    # no text token collides with the placeholder
    if name == "tiny":   # 4 x 4 patches, [CLS] dropped: what transformers' processor gives a 56-pixel image
        assert data.tokens == 16


def test_the_command_writes_json_that_reads_back_and_a_plot(tmp_path, capsys):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--model", "tiny", "--keep", "16,4", "--repeats", "2", "--out", str(out),
                 "--plot", str(plot)]) == 0
    saved = from_json(e2e.E2eResult, json.loads(out.read_text()))
    assert [r.keep for r in saved.rows] == [16, 4] and saved.timed and saved.weights == "random"
    for row in saved.rows:
        assert len(row.rounds_ms.full) == len(row.rounds_ms.desap) == len(row.rounds_ms.ideal) == 2
        assert row.flops.full >= row.flops.ideal > 0 and row.flops.desap > row.flops.ideal
    assert saved.rows[1].flops.language_keep < saved.rows[0].flops.language_keep   # K tokens into the LM
    with Image.open(plot) as image:
        assert image.format == "PNG"
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("tiny, random weights, timed on cpu (")
    assert header.count("on cpu") == 1 and "cpu cpu" not in header


def test_the_figure_plots_each_rows_numbers_against_its_budget():
    timed = e2e.run(e2e.make_plan("tiny", [16, 8, 4], "cpu", repeats=1))
    (speedup, ideal, flops) = e2e.figure(timed).axes[0].get_lines()
    for line, values in ((speedup, [r.speedup for r in timed.rows]), (ideal, [r.ideal_speedup for r in timed.rows]),
                         (flops, [r.flops_reduction for r in timed.rows])):
        assert list(line.get_xdata()) == [16, 8, 4] and list(line.get_ydata()) == values
    counted = e2e.run(e2e.make_plan("tiny", [16, 4], "meta"))
    (only,) = e2e.figure(counted).axes[0].get_lines()
    assert list(only.get_ydata()) == [r.flops_reduction for r in counted.rows]


def test_bench_e2e_counts_full_size_flops_on_meta(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "meta", "--keep", "576,64",
                 "--out", str(out)]) == 0
    saved = from_json(e2e.E2eResult, json.loads(out.read_text()))
    rows = saved.rows
    assert rows[0].flops.full > 8e12      # CLIP ViT-L/14-336 + a 7B language model over ~600 tokens
    assert rows[1].flops_reduction > 4
    assert rows[0].full_ms is None and not saved.timed
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("llava-1.5-7b, random weights, FLOPs counted on meta, bf16")
    assert "timed" not in header and machine.cpu_name() not in header

    # the vision tower's share of the pruned prefill grows as the language model shrinks
    tower_share = lambda row: row.flops.vision_tower / row.flops.desap  # noqa: E731
    smaller = [e2e.run(e2e.make_plan(name, [64], "meta")).rows[0]
               for name in ("llava-tinyllama-1.1b", "llava-qwen2-0.5b")]
    assert tower_share(rows[1]) < tower_share(smaller[0]) < tower_share(smaller[1])
    assert tower_share(smaller[1]) > 0.5     # at 64 of 576 the tower is most of a 0.5B-class model's prefill


def test_meta_counts_the_qwen_forward_exactly_without_the_matrix_work(tmp_path, capsys):
    """--device meta for a model whose forward reads token ids: the real forward passes under
    ShapesOnly count what they count on the CPU, FLOP for FLOP."""
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", "tiny-qwen3-vl", "--device", "meta", "--keep", "16,4",
                 "--out", str(out)]) == 0
    saved = from_json(e2e.E2eResult, json.loads(out.read_text()))
    assert not saved.timed and saved.device == "meta"
    timed = e2e.run(e2e.make_plan("tiny-qwen3-vl", [16, 4], "cpu", repeats=1))
    assert [r.flops for r in saved.rows] == [r.flops for r in timed.rows]
    full, small = saved.rows
    assert full.flops.full > full.flops.vision_tower > 0
    assert full.flops.ideal == full.flops.full > small.flops.ideal
    table = capsys.readouterr().out
    assert "vision tower" in table and "LM FLOP x" not in table and "tower of desap" in table


def test_cpu_attention_is_counted_as_on_meta():
    """torch counts no FLOPs for SDPA's CPU kernel; the bench counts it as the meta path does."""
    q = torch.randn(1, 4, 128, 32)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    on_meta = flops_of(lambda: sdpa(*[q.to("meta")] * 3))
    assert on_meta == 2 * 2 * 4 * 128 * 128 * 32
    assert flops_of(lambda: sdpa(q, q, q)) == on_meta
    assert flops_of(lambda: sdpa(q, q, q), shapes_only=True) == on_meta


@pytest.mark.slow
def test_qwen3_vl_8b_counts_its_full_size_flops_on_meta():
    """The real shape, 1024 image tokens (1024 x 1024 pixels), counted in little memory: the tower
    (DeepStack mergers included) about 5.8 TFLOP whatever the budget, the prefill about 21 TFLOP."""
    result = e2e.run(e2e.make_plan("qwen3-vl-8b", [64], "meta"))
    assert result.image_tokens == 1024 and not result.shrink
    flops = result.rows[0].flops
    assert 5.7e12 < flops.vision_tower < 5.9e12 and 2.1e13 < flops.full < 2.15e13
    assert flops.full > flops.desap > flops.ideal > flops.vision_tower
    assert flops.desap - flops.ideal < 0.02 * flops.desap    # saliency, merger on the branch, the op
    assert result.rows[0].flops_reduction > 2.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen3-vl-8b", "video-llava-7b"])
def test_meta_counts_equal_the_real_forward_counts_of_the_real_layouts(name):
    keeps = [64, 8]
    counted = e2e.run(e2e.make_plan(name, keeps, "meta", shrink=True))
    timed = e2e.run(e2e.make_plan(name, keeps, "cpu", repeats=1, shrink=True))
    assert [r.flops for r in counted.rows] == [r.flops for r in timed.rows]


def test_default_budgets_and_the_plans_refusals():
    assert e2e.default_keeps(576) == [576, 192, 128, 64]
    assert e2e.make_plan("tiny").keeps == [16, 5, 3, 1]
    with pytest.raises(UsageError, match="--repeats must be at least 1"):
        e2e.make_plan("tiny", None, "cpu", repeats=0)
    with pytest.raises(UsageError, match=r"--keep values must lie in \[1, 16\] \(the image tokens of tiny\), got 17"):
        e2e.make_plan("tiny", [4, 17])


def test_a_model_too_large_for_the_memory_is_refused_before_building(monkeypatch, capsys):
    build = e2e.build_model

    def meta_only(name, device, *args, **kwargs):   # the estimate builds on meta, allocating nothing
        assert device == "meta", "the model was built"
        return build(name, device, *args, **kwargs)

    monkeypatch.setattr(machine, "available_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(e2e, "build_model", meta_only)
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("... ")]
    assert len(err) == 1 and err[0].startswith("desap: error: llava-1.5-7b in fp32 needs about ")
    assert "13.2 GiB of weights" not in err[0] and "26.3 GiB of weights" in err[0]
    assert "only 8.0 GiB is available" in err[0] and "--device meta" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("name,keep", REAL_LAYOUTS)
def test_real_layouts_run_every_variant(name, keep):
    result = e2e.run(e2e.make_plan(name, [keep], "cpu", repeats=1, shrink=True))
    row = result.rows[0]
    assert row.full_ms > 0 and row.desap_ms > 0 and row.ideal_ms > 0
    # at reduced width the language model saves little, so DeSAP's own work may outweigh it (Qwen2.5-VL)
    assert row.flops.full > row.flops.ideal > 0 and row.flops.desap > row.flops.ideal


# one model of every family the bench supports (LLaVA-NeXT has no tiny one: its real shape, shrunk),
# with a budget below its token count; the other real layouts, slow
IDEAL_MODELS = [(name, 4) for name in TINY] + [("llava-next-7b", 640)] + [
    pytest.param(name, keep, marks=pytest.mark.slow)
    for name, keep in REAL_LAYOUTS if MODELS[name].family != "llava_next"]


def _no_pruning_work(monkeypatch) -> None:
    """The ideal must cost no pruning work: reading the tower's signals, or the prompt's text, raises."""
    from desap_ops.integrations.common import signals
    from desap_ops.integrations.hf import text

    def refuse(*args, **kwargs):
        raise AssertionError("the ideal did pruning work")

    for module, name in ((signals, "capture"), (text, "image_text_tokens")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("name,keep", IDEAL_MODELS)
def test_the_ideal_is_apply_desaps_first_k_tokens_with_no_pruning_work(monkeypatch, name, keep):
    """Through ``apply_desap(ideal=True)``, with no signal read and no text embedded, the language
    model gets each row's prompt with its image's tokens cut to K (LLaVA-NeXT: every newline and
    the first K - newlines visual tokens), the text untouched; the projector (LLaVA layouts) runs on
    the kept visual tokens only, never on all N; the model is unpatched after."""
    model = build_model(name, "cpu", torch.float32, shrink=True)
    data = e2e.make_batch(model, name, 2, "cpu", torch.float32)
    family, inner, n = MODELS[name].family, model.model, data.tokens
    embeds, projected, levels = [], [], []
    inner.language_model.register_forward_pre_hook(lambda m, a, k: embeds.append(k["inputs_embeds"]),
                                                   with_kwargs=True)
    if family == "qwen3_vl":
        inner.language_model.register_forward_pre_hook(
            lambda m, a, k: levels.append(k["deepstack_visual_embeds"]), with_kwargs=True)
    if family not in e2e.QWEN:   # the Qwen projector is the merger inside its encoder
        inner.multi_modal_projector.register_forward_hook(lambda m, a, o: projected.append(a[0].shape[:-1].numel()))
    with torch.no_grad():
        model(**data.inputs, logits_to_keep=1)
        _no_pruning_work(monkeypatch)
        with e2e.variant(model, "ideal", keep):
            options = model._desap.options   # the ideal: the method "first", unmerged
            assert (options.method, options.merge, options.keep) == ("first", False, keep)
            model(**data.inputs, logits_to_keep=1)
    full, ideal = embeds
    is_newline = torch.zeros(n, dtype=torch.bool)
    if family == "llava_next":
        is_newline = packed_sources(model.config, data.inputs["image_sizes"][:1])[0] < 0
        assert int(is_newline.sum()) == data.newlines > 0
    kept = is_newline.clone()
    kept[(~is_newline).nonzero()[:keep - data.newlines, 0]] = True   # the newlines count toward K
    assert int(kept.sum()) == keep
    ids = data.inputs["input_ids"]
    for row in range(ids.shape[0]):
        placeholders = (ids[row] == data.token_id).nonzero()[:, 0]
        first = int(placeholders[0])
        assert placeholders.tolist() == list(range(first, first + n))
        expected = torch.cat([full[row, :first], full[row, first:first + n][kept], full[row, first + n:]])
        torch.testing.assert_close(ideal[row], expected)
    if family not in e2e.QWEN:   # the full model projects every crop's tokens; the ideal the kept visual ones
        visual = ids.shape[0] * (n - data.newlines)
        assert projected[0] >= visual and sum(projected[1:]) == ids.shape[0] * (keep - data.newlines)
    if family == "qwen3_vl":   # every DeepStack level cut to each image's first K tokens too
        assert len(levels[0]) == len(levels[1]) == 2
        for full_level, ideal_level in zip(*levels):
            assert full_level.shape[0] == 2 * n
            torch.testing.assert_close(ideal_level, torch.cat([image[:keep] for image in full_level.split(n)]))
    assert not hasattr(model, "_desap") and data.features not in vars(inner)   # remove_desap undid the patch


# --- other pruning methods beside DeSAP (--methods) ----------------------------------------------------

BUILTINS = ["desap", "first", "random", "saliency", "similarity", "divprune"]


@pytest.fixture
def timed_by_variant(monkeypatch):
    """Each prefill "takes" a time that names its variant: full 1000 ms, the ideal 2000, the method
    at position i of BUILTINS 3000 + i (read from the patch apply_desap left on the model); the
    tower alone 0.5 ms. A time that lands on another variant or method shows in the row."""
    models = []
    build = e2e.build_model

    def hooked(*args, **kwargs):
        models.append(build(*args, **kwargs))
        return models[-1]

    def time_call_ms(fn, device):
        state = getattr(models[-1], "_desap", None)
        fn()
        if state is None:
            return 1000.0
        ideal = state.options.method == "first" and not state.options.merge   # apply_desap(ideal=True)
        return 2000.0 if ideal else 3000.0 + BUILTINS.index(state.options.method)

    monkeypatch.setattr(e2e, "build_model", hooked)
    monkeypatch.setattr(e2e, "time_call_ms", time_call_ms)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl"])
def test_each_methods_time_lands_on_it_in_every_round(timed_by_variant, name):
    others = BUILTINS[1:]
    plan = e2e.make_plan(name, [TINY[name], 4], "cpu", repeats=2, methods=["divprune", *others])
    assert plan.methods == ["desap", "divprune", "first", "random", "saliency", "similarity"]
    result = e2e.run(plan)
    assert result.methods == plan.methods
    for row in result.rows:
        assert (row.rounds_ms.full, row.rounds_ms.desap, row.rounds_ms.ideal) == ([1000.0] * 2, [3000.0] * 2,
                                                                                 [2000.0] * 2)
        assert list(row.rounds_ms.methods) == list(row.methods) == plan.others
        for method, cost in row.methods.items():
            ms = 3000.0 + BUILTINS.index(method)
            assert row.rounds_ms.methods[method] == [ms] * 2
            assert (cost.ms, cost.speedup, cost.overhead_ms, cost.share_of_ideal_speedup) == (
                ms, 1000.0 / ms, ms - 2000.0, 2000.0 / ms)
        assert list(row.costs()) == plan.methods and row.costs()["desap"].ms == 3000.0


def test_desap_alone_keeps_the_earlier_layout():
    result = e2e.run(e2e.make_plan("tiny", [4], "meta"))
    assert result.methods is None and result.rows[0].methods is None and result.rows[0].flops.methods is None
    assert "methods" not in json.dumps(to_json(result))


def test_each_methods_pruning_flops_are_its_own_work_beyond_the_ideal():
    """LLaVA layout, counted from the pieces: first, random and saliency choose with no matrix work,
    so beyond the ideal they cost the merge alone, the same for all three; DivPrune adds its
    distance matrix (2 N^2 D) and one matrix-vector product per kept token (2 N D each);
    similarity adds the attention branch's projection and the task scores."""
    keep = 4
    result = e2e.run(e2e.make_plan("tiny", [16, keep], "meta", methods=BUILTINS))
    config = build_model("tiny", "meta", torch.float32).config
    n, width = 16, config.vision_config.hidden_size
    for row in result.rows:
        costs = row.costs()
        merge = costs["first"].pruning_flops
        assert merge > 0 and costs["random"].pruning_flops == costs["saliency"].pruning_flops == merge
        assert costs["divprune"].pruning_flops - merge == 2 * n * width * (n + row.keep)
        assert costs["similarity"].pruning_flops > merge
        assert costs["desap"].pruning_flops == row.flops.desap - row.flops.ideal
        for cost in costs.values():
            assert cost.flops == row.flops.ideal + cost.pruning_flops
            assert cost.flops_reduction == row.flops.full / cost.flops
            assert cost.ms is None


def test_meta_counts_each_methods_qwen_forward_exactly():
    """The Qwen models count every method on the real forward passes: under ShapesOnly (--device
    meta) the same FLOPs as on the CPU, method by method."""
    methods = ["first", "similarity", "divprune"]
    counted = e2e.run(e2e.make_plan("tiny-qwen3-vl", [16, 4], "meta", methods=methods))
    timed = e2e.run(e2e.make_plan("tiny-qwen3-vl", [16, 4], "cpu", repeats=1, methods=methods))
    assert [r.flops for r in counted.rows] == [r.flops for r in timed.rows]
    small = counted.rows[1]
    assert set(small.flops.methods) == set(methods)
    assert small.methods["divprune"].pruning_flops > small.methods["first"].pruning_flops > 0


def test_the_command_with_methods_writes_json_that_reads_back_a_table_and_one_series_per_method(tmp_path, capsys):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--model", "tiny", "--keep", "16,4", "--repeats", "1", "--methods",
                 "saliency,divprune", "--out", str(out), "--plot", str(plot)]) == 0
    saved = from_json(e2e.E2eResult, json.loads(out.read_text()))
    assert saved.methods == ["desap", "saliency", "divprune"]
    for row in saved.rows:
        assert list(row.methods) == ["saliency", "divprune"] and len(row.rounds_ms.methods["divprune"]) == 1
        assert row.methods["divprune"].ms == row.rounds_ms.methods["divprune"][0]
    table = capsys.readouterr().out.splitlines()
    method_lines = [line.split() for line in table if line.split()[:1] in (["16"], ["4"]) and len(line.split()) == 9]
    assert [(words[0], words[1]) for words in method_lines] == [
        (keep, name) for keep in ("16", "4") for name in ("desap", "saliency", "divprune")]
    lines = e2e.figure(saved).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["desap", "saliency", "divprune", "ideal (no pruning work)"]
    for line, name in zip(lines, saved.methods):
        assert list(line.get_xdata()) == [16, 4]
        assert list(line.get_ydata()) == [row.costs()[name].speedup for row in saved.rows]


def test_an_unknown_method_is_one_line_and_exit_2_before_anything_is_built(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(e2e, "build_model", refuse)
    assert main(["bench", "e2e", "--model", "tiny", "--methods", "desap,nope"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("... ")]
    assert err == ["desap: error: --methods: 'nope' is not a registered pruning method; registered: "
                   + ", ".join(available_methods())]
    assert set(BUILTINS) <= set(available_methods())
