"""``desap bench e2e``: the prompts each variant feeds the language model, each time landing on its
variant, the rows covering the plan, FLOPs from the pieces equal to the real forward's and FLOPs on
meta equal to the CPU's, the ideal being apply_desap's first K tokens with no pruning work, the
memory refusal, and the command's JSON, table and plot."""
import json

import pytest
import torch
from PIL import Image

from desap_ops.benchmarks import e2e, e2e_plan, e2e_run, machine
from desap_ops.benchmarks.arguments import UsageError
from desap_ops.benchmarks.flops import flops_of
from desap_ops.benchmarks.skeleton import from_json
from desap_ops.cli.main import main
from desap_ops.integrations.common.layout import packed_sources
from desap_ops.methods import DEFAULT_METHOD, available_methods, get_method
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
    build = e2e_run.build_model

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.language_model.register_forward_pre_hook(
            lambda module, args_, kwargs_: lengths.append(kwargs_["inputs_embeds"].shape[1]), with_kwargs=True)
        return model

    def time_call_ms(fn, device):
        before = len(lengths)
        fn()
        return float(lengths[-1]) if len(lengths) > before else 0.5

    monkeypatch.setattr(e2e_run, "build_model", hooked)
    monkeypatch.setattr(e2e_run, "time_call_ms", time_call_ms)


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
        assert row.full.rounds_ms == [full_length] * 2
        assert row.desap.rounds_ms == row.ideal.rounds_ms == [pruned] * 2
        assert (row.full.ms, row.desap.ms, row.ideal.ms) == (full_length, pruned, pruned)
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
    assert (saved.device, saved.methods) == ("cpu", [DEFAULT_METHOD])
    for row in saved.rows:
        assert len(row.full.rounds_ms) == len(row.desap.rounds_ms) == len(row.ideal.rounds_ms) == 2
        assert row.full.flops >= row.ideal.flops > 0 and row.desap.flops > row.ideal.flops
    assert saved.rows[1].pieces.language_keep < saved.rows[0].pieces.language_keep   # K tokens into the LM
    with Image.open(plot) as image:
        assert image.format == "PNG"
    printed = capsys.readouterr().out.splitlines()
    assert saved.environment.device in printed[0]   # the header names the machine that timed it
    assert _budget_lines(printed, saved) == [[row.keep, round(row.full.ms, 2), round(row.desap.ms, 2),
                                              round(row.ideal.ms, 2)] for row in saved.rows]


def _budget_lines(printed: list[str], result: e2e.E2eResult, columns: int = 4) -> list[list[float]]:
    """The first ``columns`` numbers of each line of the main table that starts with a budget."""
    keeps = {str(row.keep) for row in result.rows}
    lines = [line.split() for line in printed if line.split()[:1] and line.split()[0] in keeps]
    return [[float(word) for word in words[:columns]] for words in lines[:len(result.rows)]]


def test_the_figure_plots_each_rows_numbers_against_its_budget():
    timed = e2e.run(e2e.make_plan("tiny", [16, 8, 4], "cpu", repeats=1))
    (speedup, ideal, flops) = e2e.figure(timed).axes[0].get_lines()
    for line, values in ((speedup, [r.desap.speedup for r in timed.rows]),
                         (ideal, [r.ideal_speedup for r in timed.rows]),
                         (flops, [r.desap.flops_reduction for r in timed.rows])):
        assert list(line.get_xdata()) == [16, 8, 4] and list(line.get_ydata()) == values
    counted = e2e.run(e2e.make_plan("tiny", [16, 4], "meta"))
    (only,) = e2e.figure(counted).axes[0].get_lines()
    assert list(only.get_ydata()) == [r.desap.flops_reduction for r in counted.rows]


def test_bench_e2e_counts_full_size_flops_on_meta(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "meta", "--keep", "576,64",
                 "--out", str(out)]) == 0
    saved = from_json(e2e.E2eResult, json.loads(out.read_text()))
    rows = saved.rows
    assert rows[0].full.flops > 8e12      # CLIP ViT-L/14-336 + a 7B language model over ~600 tokens
    assert rows[1].desap.flops_reduction > 4
    assert rows[0].full.ms is None and rows[0].desap.ms is None and not saved.timed
    assert (saved.device, saved.dtype) == ("meta", "bf16")
    printed = capsys.readouterr().out.splitlines()
    assert machine.cpu_name() not in printed[0]   # nothing was timed, so no machine is named
    # GFLOP full, desap and ideal per budget, then the ratios: no times
    assert _budget_lines(printed, saved) == [[row.keep, float(f"{row.full.flops / 1e9:.4g}"),
                                              float(f"{row.desap.flops / 1e9:.4g}"),
                                              float(f"{row.ideal.flops / 1e9:.4g}")] for row in rows]

    # the vision tower's share of the pruned prefill grows as the language model shrinks
    tower_share = lambda row: row.pieces.vision_tower / row.desap.flops  # noqa: E731
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
    assert [_flops(r) for r in saved.rows] == [_flops(r) for r in timed.rows]
    full, small = saved.rows
    assert full.full.flops > full.pieces.vision_tower > 0
    assert full.ideal.flops == full.full.flops > small.ideal.flops
    # the encoder is counted apart, the language model is not: per budget the three GFLOP, DeSAP's
    # FLOP ratio and the tower's share of DeSAP's prefill, no language-model ratio
    assert full.language_flops_reduction is None
    printed = capsys.readouterr().out.splitlines()
    lines = [line.split() for line in printed if line.split()[:1] in (["16"], ["4"])]
    assert [len(words) for words in lines] == [6, 6]
    assert [words[-1] for words in lines] == [f"{r.pieces.vision_tower / r.desap.flops:.0%}" for r in saved.rows]


def _flops(row: e2e.E2eRow) -> tuple:
    """Every FLOP count of a row: the full model's, the ideal's, each method's and the pieces'."""
    return row.full.flops, row.ideal.flops, {name: method.flops for name, method in row.methods.items()}, row.pieces


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
    row = result.rows[0]
    tower = row.pieces.vision_tower
    assert 5.7e12 < tower < 5.9e12 and 2.1e13 < row.full.flops < 2.15e13
    assert row.full.flops > row.desap.flops > row.ideal.flops > tower
    # DeSAP's own work: the received attention at the last block (the op's count: 4 n^2 H d, 4096
    # patches, 16 heads of 72), the merger on that block's branch (1024 rows of 4 x 1152 through
    # 4608 -> 4608 -> 4096) and the operator (under 1 GFLOP), about 2.2% of the pruned prefill
    received, merger = 4 * 4096**2 * 16 * 72, 2 * 1024 * 4608 * (4608 + 4096)
    assert received + merger < row.desap.pruning_flops < received + merger + 1e9
    assert row.desap.pruning_flops < 0.025 * row.desap.flops
    assert row.desap.flops_reduction > 2.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen3-vl-8b", "video-llava-7b"])
def test_meta_counts_equal_the_real_forward_counts_of_the_real_layouts(name):
    keeps = [64, 8]
    counted = e2e.run(e2e.make_plan(name, keeps, "meta", shrink=True))
    timed = e2e.run(e2e.make_plan(name, keeps, "cpu", repeats=1, shrink=True))
    assert [_flops(r) for r in counted.rows] == [_flops(r) for r in timed.rows]


def test_default_budgets_and_the_plans_refusals():
    assert e2e.default_keeps(576) == [576, 192, 128, 64]
    assert e2e.make_plan("tiny").keeps == [16, 5, 3, 1]
    with pytest.raises(UsageError, match="--repeats must be at least 1"):
        e2e.make_plan("tiny", None, "cpu", repeats=0)
    with pytest.raises(UsageError, match=r"--keep values must lie in \[1, 16\] \(the image tokens of tiny\), got 17"):
        e2e.make_plan("tiny", [4, 17])


def test_a_model_too_large_for_the_memory_is_refused_before_building(monkeypatch, capsys):
    build = e2e_plan.build_model

    def meta_only(name, device, *args, **kwargs):   # the estimate builds on meta, allocating nothing
        assert device == "meta", "the model was built"
        return build(name, device, *args, **kwargs)

    monkeypatch.setattr(machine, "available_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(e2e_plan, "build_model", meta_only)
    monkeypatch.setattr(e2e_run, "build_model", meta_only)
    assert main(["bench", "e2e", "--model", "llava-1.5-7b", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("... ")]
    assert len(err) == 1 and err[0].startswith("desap: error: ")   # one line, no traceback
    # the fp32 weights (not bf16's 13.2 GiB), the memory there is, and the way out: counting on meta
    assert "26.3 GiB" in err[0] and "13.2 GiB" not in err[0] and "8.0 GiB" in err[0] and "--device meta" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("name,keep", REAL_LAYOUTS)
def test_real_layouts_run_every_variant(name, keep):
    result = e2e.run(e2e.make_plan(name, [keep], "cpu", repeats=1, shrink=True))
    row = result.rows[0]
    assert row.full.ms > 0 and row.desap.ms > 0 and row.ideal.ms > 0
    # at reduced width the language model saves little, so DeSAP's own work may outweigh it (Qwen2.5-VL)
    assert row.full.flops > row.ideal.flops > 0 and row.desap.flops > row.ideal.flops


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
        with e2e.variant(model, e2e.Baseline.IDEAL, keep):
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


# --- every registered pruning method beside DeSAP (--methods) ------------------------------------------

METHODS = list(available_methods())   # DeSAP and the other registered methods
OTHERS = [name for name in METHODS if name != DEFAULT_METHOD]


@pytest.fixture
def timed_by_variant(monkeypatch):
    """Each prefill "takes" a time that names its variant: full 1000 ms, the ideal 2000, the method
    at position i of METHODS 3000 + i (read from the patch apply_desap left on the model); the
    tower alone 0.5 ms. A time that lands on another variant or method shows in the row."""
    models = []
    build = e2e_run.build_model

    def hooked(*args, **kwargs):
        models.append(build(*args, **kwargs))
        return models[-1]

    def time_call_ms(fn, device):
        state = getattr(models[-1], "_desap", None)
        fn()
        if state is None:
            return 1000.0
        # apply_desap(ideal=True) sets merge False; the method "first" at its default leaves it None
        ideal = state.options.method == "first" and state.options.merge is False
        return 2000.0 if ideal else 3000.0 + METHODS.index(state.options.method)

    monkeypatch.setattr(e2e_run, "build_model", hooked)
    monkeypatch.setattr(e2e_run, "time_call_ms", time_call_ms)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3-vl"])
def test_each_methods_time_lands_on_it_in_every_round(timed_by_variant, name):
    """Every method, DeSAP included, gets its own times, and its ratios read the full model's
    (1000 ms) and the ideal's (2000 ms) medians, not each other's."""
    given = OTHERS[::-1]
    plan = e2e.make_plan(name, [TINY[name], 4], "cpu", repeats=2, methods=given)
    assert plan.methods == [DEFAULT_METHOD, *given]
    result = e2e.run(plan)
    assert result.methods == plan.methods
    for row in result.rows:
        assert (row.full.rounds_ms, row.ideal.rounds_ms) == ([1000.0] * 2, [2000.0] * 2)
        assert list(row.methods) == plan.methods
        for method, cost in row.methods.items():
            ms = 3000.0 + METHODS.index(method)
            assert cost.rounds_ms == [ms] * 2 and cost.ms == ms
            assert (cost.speedup, cost.overhead_ms, cost.share_of_ideal_speedup) == (1000.0 / ms, ms - 2000.0,
                                                                                     2000.0 / ms)
        assert row.ideal_speedup == 0.5


def test_desap_alone_is_one_method_row_per_budget():
    result = e2e.run(e2e.make_plan("tiny", [4], "meta"))
    assert result.methods == [DEFAULT_METHOD] and result.others == []
    assert [list(row.methods) for row in result.rows] == [[DEFAULT_METHOD]]


def _real_forward_flops(name: str, keep: int, methods: list[str]) -> dict:
    """FLOPs torch counts in the real forward of each variant on a CPU (no pieces, no meta)."""
    model = build_model(name, "cpu", torch.float32)
    data = e2e.make_batch(model, name, 1, "cpu", torch.float32)
    counted = {}
    with torch.no_grad():
        for variant in (e2e.Baseline.FULL, e2e.Baseline.IDEAL, *methods):
            with e2e.variant(model, variant, keep):
                counted[variant] = flops_of(lambda: model(**data.inputs, logits_to_keep=1))
    return counted


def test_flops_from_the_pieces_equal_the_real_forward_and_fall_with_the_budget():
    """LLaVA layout: every variant counted from the pieces (on meta) equals torch's count of the
    real forward pass, except the tower's attention capture that a method reading the tower's
    signals (the saliency, the attention branch, the keys) adds and the pieces leave out: the same
    few FLOPs for every such method and layer read, a negligible share. As the budget shrinks the ideal and every method
    cost less, the full model the same."""
    keeps = [16, 8, 4]
    result = e2e.run(e2e.make_plan("tiny", keeps, "meta", methods=OTHERS))
    readout = set()
    for row in result.rows:
        real = _real_forward_flops("tiny", row.keep, result.methods)
        assert (row.full.flops, row.ideal.flops) == (real[e2e.Baseline.FULL], real[e2e.Baseline.IDEAL])
        for name, cost in row.methods.items():
            reads = get_method(name).reads
            if reads & {"saliency", "attn", "keys", "received"}:
                # the feature layer's capture, whose [CLS] attention the pieces leave out (the
                # received attention, HiPrune's at two blocks, the pieces count as the op does)
                readout.add(real[name] - cost.flops)
            else:
                assert cost.flops == real[name], name
    (capture,) = readout
    assert 0 < capture < 1e-3 * result.rows[0].full.flops
    for larger, smaller in zip(result.rows, result.rows[1:]):
        assert larger.full.flops == smaller.full.flops and larger.ideal.flops > smaller.ideal.flops
        for name in result.methods:
            assert larger.methods[name].flops > smaller.methods[name].flops, name
            assert larger.methods[name].flops_reduction < smaller.methods[name].flops_reduction, name


def test_each_methods_pruning_flops_are_its_own_work_beyond_the_ideal():
    """LLaVA layout, counted from the pieces, each method at its own merge default: first, random
    and saliency choose with no matrix work and drop the rest, so beyond the ideal they cost
    nothing counted; DivPrune projects all N tokens (the rows it selects on), forms its distance
    matrix (2 N^2 C) and one matrix-vector product per kept token (2 N C each); similarity adds the
    attention branch's projection and the task scores; DeSAP its operator and its merge."""
    result = e2e.run(e2e.make_plan("tiny", [16, 4], "meta", methods=OTHERS))
    model = build_model("tiny", "meta", torch.float32)
    n, text_width = 16, model.config.text_config.hidden_size
    project_all = flops_of(lambda: model.model.multi_modal_projector(
        torch.empty(1, n, model.config.vision_config.hidden_size, device="meta")))
    for row in result.rows:
        costs = row.methods
        assert costs["first"].pruning_flops == costs["random"].pruning_flops == costs["saliency"].pruning_flops == 0
        assert costs["divprune"].pruning_flops == project_all + 2 * n * text_width * (n + row.keep)
        assert costs["similarity"].pruning_flops > project_all
        assert all(cost.ms is None for cost in costs.values())


def test_meta_counts_each_methods_qwen_forward_exactly():
    """The Qwen models count every method on the real forward passes: under ShapesOnly (--device
    meta) the same FLOPs as on the CPU, method by method."""
    methods = ["first", "similarity", "divprune"]
    counted = e2e.run(e2e.make_plan("tiny-qwen3-vl", [16, 4], "meta", methods=methods))
    timed = e2e.run(e2e.make_plan("tiny-qwen3-vl", [16, 4], "cpu", repeats=1, methods=methods))
    assert [_flops(r) for r in counted.rows] == [_flops(r) for r in timed.rows]
    small = counted.rows[1]
    assert list(small.methods) == [DEFAULT_METHOD, *methods]
    # DivPrune's distances and greedy steps; first drops what it does not keep: no work counted
    assert small.methods["divprune"].pruning_flops > small.methods["first"].pruning_flops == 0


def test_the_command_with_methods_writes_json_that_reads_back_a_table_and_one_series_per_method(tmp_path, capsys):
    out, plot = tmp_path / "e2e.json", tmp_path / "e2e.png"
    assert main(["bench", "e2e", "--model", "tiny", "--keep", "16,4", "--repeats", "1", "--methods",
                 "saliency,divprune", "--out", str(out), "--plot", str(plot)]) == 0
    saved = from_json(e2e.E2eResult, json.loads(out.read_text()))
    assert saved.methods == [DEFAULT_METHOD, "saliency", "divprune"]
    for row in saved.rows:
        assert list(row.methods) == saved.methods
        assert row.methods["divprune"].rounds_ms == [row.methods["divprune"].ms]
    # after the main table, one line per method at each budget: the budget, the method, its median
    printed = capsys.readouterr().out.splitlines()
    method_lines = [line.split() for line in printed if line.split()[1:2] and line.split()[1] in saved.methods]
    assert [(int(words[0]), words[1], float(words[2])) for words in method_lines] == [
        (row.keep, name, round(row.methods[name].ms, 2)) for row in saved.rows for name in saved.methods]
    # one series per method, DeSAP first, then the ideal's
    *series, ideal = e2e.figure(saved).axes[0].get_lines()
    assert [line.get_label() for line in series] == saved.methods
    for line, name in zip(series, saved.methods):
        assert list(line.get_xdata()) == [16, 4]
        assert list(line.get_ydata()) == [row.methods[name].speedup for row in saved.rows]
    assert list(ideal.get_ydata()) == [row.ideal_speedup for row in saved.rows]


def test_an_unknown_method_is_one_line_and_exit_2_before_anything_is_built(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(e2e_plan, "build_model", refuse)
    monkeypatch.setattr(e2e_run, "build_model", refuse)
    assert main(["bench", "e2e", "--model", "tiny", "--methods", "desap,nope"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("... ")]
    # one line naming the unknown method and every registered one
    assert len(err) == 1 and err[0].startswith("desap: error: ") and "'nope'" in err[0]
    assert all(name in err[0] for name in METHODS)


def test_a_depth_factor_divides_the_language_models_flops_and_keeps_the_towers_share(capsys):
    """LLaVA-1.5-7B eight times shallower (3 of 24 CLIP layers, 4 of 32 language layers) on meta:
    the language model's FLOPs and the tower's are the full depth's over 8 but for the output layer
    on the last position and the tower's embeddings and norms, so the tower's share of the prefill
    stays the full model's."""
    full, shallow = (e2e.run(e2e.make_plan("llava-1.5-7b", [576, 64], "meta", depth_factor=f)) for f in (1, 8))
    assert shallow.depth_factor == 8 and full.depth_factor == 1
    for deep, cut in zip(full.rows, shallow.rows):
        assert cut.pieces.language_full == pytest.approx(deep.pieces.language_full / 8, rel=0.005)
        assert cut.pieces.language_keep == pytest.approx(deep.pieces.language_keep / 8, rel=0.005)
        assert deep.pieces.vision_tower / 8 < cut.pieces.vision_tower < deep.pieces.vision_tower / 8 * 1.02
    share = lambda row: row.pieces.vision_tower / row.full.flops  # noqa: E731
    assert share(shallow.rows[0]) == pytest.approx(share(full.rows[0]), rel=0.02)
    assert main(["bench", "e2e", "--model", "qwen3-vl-8b", "--depth-factor", "4", "--device", "meta"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--depth-factor must divide qwen3-vl-8b's 27 tower blocks and 36 language-model layers, got 4")
