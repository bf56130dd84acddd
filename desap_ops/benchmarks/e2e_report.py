"""``desap bench e2e``'s output: the table it prints and the figure ``--plot`` draws."""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from .e2e_result import E2eResult

if TYPE_CHECKING:   # matplotlib is imported when a plot is asked for
    from matplotlib.figure import Figure


def describe(result: E2eResult) -> str:
    """What was measured where: "timed on cpu (AMD EPYC, 2 threads)" or "FLOPs counted on meta"."""
    if result.timed:
        return f"timed on {result.device} ({result.environment.device})"
    return f"FLOPs counted on {result.device}"


def depth_note(result: E2eResult) -> str:
    """" at 1/F depth (tower X% of prefill FLOPs)" for a run with a depth factor, else ""."""
    if result.depth_factor == 1:
        return ""
    row = result.rows[0]
    tower = row.pieces.vision_tower if row.pieces is not None else None
    share = f", tower {tower / row.full.flops:.1%} of prefill FLOPs" if tower and row.full.flops else ""
    return f" at 1/{result.depth_factor} depth{share}"


def table(result: E2eResult) -> str:
    """The result as text: a header (model, weights, what was measured on which device, settings,
    versions), one line per budget, and with other methods one line per method at each budget."""
    env = result.environment
    shrunk = " shrunk (2 layers and 2 heads per transformer)" if result.shrink else ""
    shrunk += depth_note(result)
    lines = [f"{result.model}{shrunk}, {result.weights} weights, {describe(result)}, {result.dtype}, batch "
             f"{result.batch}, {result.image_tokens} image + {result.text_tokens} text tokens; torch {env.torch}, "
             f"{env.date}"]
    lines += _timed_table(result) if result.timed else _counted_table(result)
    if result.others:
        lines += methods_table(result)
    return "\n".join(lines)


def _timed_table(result: E2eResult) -> list[str]:
    """The rounds, the load and the vision tower's time; per budget DeSAP's times and FLOPs."""
    load = result.load_average
    rounds = f"{result.repeats} round{'s' * (result.repeats != 1)}"
    note = (f"medians of {rounds} after {result.warmup_rounds} warm-up, the variants "
            f"interleaved; load average {load.before[0]:.2f} before, {load.after[0]:.2f} after")
    if result.vision_tower_ms is not None:
        full = statistics.median(r.full.ms for r in result.rows)
        note += (f"; vision tower alone {result.vision_tower_ms:.1f} ms "
                 f"({result.vision_tower_ms / full:.0%} of the full prefill)")
    lines = [note, f"{'keep':>6}{'full ms':>10}{'desap ms':>10}{'ideal ms':>10}{'speedup':>9}{'ideal':>7}"
                   f"{'of ideal':>10}{'overhead ms':>13}{'share':>7}{'GFLOP full':>12}{'GFLOP desap':>13}"
                   f"{'FLOP x':>8}"]
    for r in result.rows:
        desap = r.desap
        lines.append(f"{r.keep:>6}{r.full.ms:>10.2f}{desap.ms:>10.2f}{r.ideal.ms:>10.2f}"
                     f"{desap.speedup:>9.2f}{r.ideal_speedup:>7.2f}{desap.share_of_ideal_speedup:>10.0%}"
                     f"{desap.overhead_ms:>13.3f}{desap.overhead_share:>7.0%}{r.full.flops / 1e9:>12.4g}"
                     f"{desap.flops / 1e9:>13.4g}{desap.flops_reduction:>8.2f}")
    return lines


def _counted_table(result: E2eResult) -> list[str]:
    """Per budget the FLOPs of each variant; the tower's share of the DeSAP prefill grows as K
    shrinks (pruning after the encoder cannot save it)."""
    rows, lines = result.rows, []
    first = rows[0].pieces
    # the LLaVA pieces count the language model apart; the Qwen models count their encoder apart
    tower = first is not None and first.vision_tower is not None
    language = rows[0].language_flops_reduction is not None
    if tower:
        lines.append(f"vision tower {first.vision_tower / 1e9:.4g} GFLOP, "
                     f"{first.vision_tower / rows[0].full.flops:.0%} of the full prefill")
    lines.append(f"{'keep':>6}{'GFLOP full':>12}{'GFLOP desap':>13}{'GFLOP ideal':>13}{'FLOP x':>8}"
                 + f"{'LM FLOP x':>11}" * language + f"{'tower of desap':>16}" * tower)
    for r in rows:
        desap = r.desap
        lines.append(f"{r.keep:>6}{r.full.flops / 1e9:>12.4g}{desap.flops / 1e9:>13.4g}{r.ideal.flops / 1e9:>13.4g}"
                     f"{desap.flops_reduction:>8.2f}"
                     + (f"{r.language_flops_reduction:>11.2f}" if language else "")
                     + (f"{r.pieces.vision_tower / desap.flops:>16.0%}" if tower else ""))
    return lines


def methods_table(result: E2eResult) -> list[str]:
    """One line per method at each budget, DeSAP first: its prefill against the full model and the
    ideal, and its pruning work (time and FLOPs beyond the ideal)."""
    timed = result.timed
    lines = ["each method's prefill beside DeSAP; pruning = beyond the ideal (the first K tokens, no work)",
             f"{'keep':>6}  {'method':<12}" + (f"{'ms':>10}{'speedup':>9}{'of ideal':>10}{'pruning ms':>12}" if timed
                                               else "") + f"{'GFLOP':>10}{'FLOP x':>8}{'pruning MFLOP':>15}"]
    for r in result.rows:
        for name, cost in r.methods.items():
            lines.append(f"{r.keep:>6}  {name:<12}"
                         + (f"{cost.ms:>10.2f}{cost.speedup:>9.2f}{cost.share_of_ideal_speedup:>10.0%}"
                            f"{cost.overhead_ms:>12.2f}" if timed else "")
                         + f"{cost.flops / 1e9:>10.4g}{cost.flops_reduction:>8.2f}{cost.pruning_flops / 1e6:>15.4g}")
    return lines


def figure(result: E2eResult) -> Figure:
    """Speedups (timed runs) and FLOP reduction against the budget; with other methods, each
    method's speedup (timed) or FLOP reduction (meta) beside the ideal's."""
    from matplotlib.figure import Figure

    rows = result.rows
    keeps = [r.keep for r in rows]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    if result.others:   # one series per method, DeSAP first
        markers = "ov^<>sdph*"
        for i, name in enumerate(result.methods):
            values = [r.methods[name].speedup if result.timed else r.methods[name].flops_reduction for r in rows]
            ax.plot(keeps, values, f"{markers[i % len(markers)]}-", label=name)
        if result.timed:
            ax.plot(keeps, [r.ideal_speedup for r in rows], "k--", label="ideal (no pruning work)")
        ax.set_ylabel(f"full model / method ({'time' if result.timed else 'FLOPs'}, x)")
    elif result.timed:
        ax.plot(keeps, [r.desap.speedup for r in rows], "o-", label="DeSAP speedup (timed)")
        ax.plot(keeps, [r.ideal_speedup for r in rows], "s--", label="ideal speedup (no pruning work)")
        ax.plot(keeps, [r.desap.flops_reduction for r in rows], "^:", label="FLOP reduction (counted)")
        ax.set_ylabel("full model / DeSAP or ideal (x)")
    else:
        ax.plot(keeps, [r.desap.flops_reduction for r in rows], "^:", label="FLOP reduction (counted)")
        ax.set_ylabel("FLOPs, full model / DeSAP (x)")
    ax.set_xlabel(f"image tokens kept (of {result.image_tokens})")
    name = result.model + (" shrunk" if result.shrink else "")
    # a depth note takes a line of its own: the title is two lines of 600 pixels at most
    head = f"{name}{depth_note(result)}\n" if result.depth_factor != 1 else f"{name}, "
    ax.set_title(f"{head}{result.weights} weights, {result.dtype}, batch {result.batch}\n"
                 f"{describe(result)}", fontsize=10)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
