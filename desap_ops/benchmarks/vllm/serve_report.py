"""``desap bench serve``'s output: the table it prints and the figure ``--plot`` draws."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .record import machine_title
from .serve_analysis import TARGET_SHARE, ServeRow
from .serve_run import ServeResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: ServeResult) -> str:
    """The result as text: one line per (setting, concurrency), ratios against the full model."""
    lines = [f"vllm serve + vllm bench serve (random-mm), {result.model} ({result.weights} weights, "
             f"{result.dtype}), {result.image_tokens} tokens an image, {result.input_len} words in, "
             f"{result.max_tokens} tokens out; {machine_title(result.environment, result.engine.binding)}; "
             f"{result.environment.date}",
             f"{'setting':>14}{'conc':>6}{'req':>5}{'req/s':>9}{'x':>6}{'ideal%':>8}{'out tok/s':>11}"
             f"{'TTFT ms':>10}{'p99':>9}{'TPOT ms':>9}{'p99':>8}{'prefill/req':>12}{'peak KV':>9}"]
    for r in result.rows:
        share = None if r.share_of_ideal is None else 100 * r.share_of_ideal
        lines.append(f"{r.setting:>14}{r.concurrency:>6}{r.completed:>5}{r.requests_per_s:>9.3f}"
                     f"{_fmt(r.requests_per_s_x, '.2f'):>6}{_fmt(share, '.1f'):>8}{r.output_tokens_per_s:>11.2f}"
                     f"{r.ttft_ms_median:>10.0f}{r.ttft_ms_p99:>9.0f}{r.tpot_ms_median:>9.0f}"
                     f"{r.tpot_ms_p99:>8.0f}{r.prefill_tokens_per_request:>12.1f}"
                     f"{_fmt(r.peak_kv_usage, '.1%'):>9}")
    aim = result.target
    if aim:
        lines.append(f"target (keep={aim.keep} of {aim.of}: >= {aim.share_needed:.0%} of the ideal and >= the "
                     f"full model at every concurrency): {'holds' if aim.holds else 'does NOT hold'}")
    lines.append("x: requests/s against the full model at the same concurrency; ideal%: DeSAP's (or the "
                 "method's) share of the ideal's requests/s at the same budget; method=K: that method asked for per "
                 "request on DeSAP's server at K; prefill/req: prompt tokens the server scheduled per request; "
                 "peak KV: highest vllm:kv_cache_usage_perc polled during the level")
    return "\n".join(lines)


PALETTE = tuple(f"C{i}" for i in range(10) if i != 7)   # matplotlib's cycle without its grey (C7), the full model's


def figure(result: ServeResult) -> Figure:
    """Request and output-token throughput, median TTFT and DeSAP's share of the ideal against
    concurrency: one line per setting (the full model grey, DeSAP solid and the ideal dashed in
    their budget's colour, another method dash-dotted with a colour and a marker of its own, so
    that ten methods at one budget stay apart; only DeSAP's shares are written on the plot). The
    layout is constrained, so that the two-line title stays within the figure at any width."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), dpi=100, layout="constrained")
    (rps, out), (ttft, share) = fig.subplots(2, 2)
    keeps = sorted({r.keep for r in result.rows if r.keep}, reverse=True)
    series: dict[str, list[ServeRow]] = {}
    for r in result.rows:
        series.setdefault(r.setting, []).append(r)
    for name, rows in series.items():
        keep, ideal, method = rows[0].keep, rows[0].ideal, rows[0].method
        others = result.methods or []
        style = dict(color="grey", marker="o") if keep is None else dict(
            color=f"C{keeps.index(keep)}", marker="s" if ideal else "o", linestyle="--" if ideal else "-")
        if method is not None:   # its colour after the budgets' (C0, C1, ...), the same at every budget
            style.update(color=PALETTE[(len(keeps) + others.index(method)) % len(PALETTE)],
                         marker="^v<>Dph*"[others.index(method) % 8], linestyle="-.")
        levels = [r.concurrency for r in rows]
        for axis, attribute in ((rps, "requests_per_s"), (out, "output_tokens_per_s"), (ttft, "ttft_ms_median")):
            axis.plot(levels, [getattr(r, attribute) for r in rows], label=name, **style)
        if keep is not None and not ideal and None not in [r.share_of_ideal for r in rows]:
            share.plot(levels, [100 * r.share_of_ideal for r in rows], label=f"{name} / ideal", **style)
            for r in rows if method is None else ():
                share.annotate(f"{100 * r.share_of_ideal:.0f}%", (r.concurrency, 100 * r.share_of_ideal),
                               textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7, color=style["color"])
    share.axhline(100 * TARGET_SHARE, color="red", lw=0.8, ls=":", label=f"target {TARGET_SHARE:.0%}")
    share.margins(y=0.2)
    titles = ((rps, "requests / s"), (out, "output tokens / s"), (ttft, "median time to first token (ms)"),
              (share, "request throughput, % of the ideal's" if result.methods
               else "DeSAP's request throughput, % of the ideal's"))
    for axis, title in titles:
        axis.set_xscale("log", base=2)
        axis.set_xticks(result.concurrency, [str(c) for c in result.concurrency])
        axis.set_xlabel("concurrent requests (--max-concurrency)")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    ttft.set_yscale("log")
    fig.suptitle(f"{result.model} ({result.weights} weights, {result.dtype}, {result.image_tokens} tokens an image), "
                 f"vllm bench serve random-mm, {result.max_tokens} tokens out\n"
                 f"{machine_title(result.environment, result.engine.binding)}", fontsize=10)
    return fig
