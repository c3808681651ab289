"""A run's visual report: one PNG of training curves and one self-contained HTML page.

Inputs, all in the run directory: ``metrics.parquet`` (required), ``eval.json``
(optional; any subset of ``{"preference_accuracy": {"before", "after"},
"task_accuracy": {...}, ...}``, nested groups allowed, and eval's ``intervals``:
each accuracy's count and 95% Wilson interval, drawn as error bars and interval
bars, and the before/after difference with its paired interval) and
``config.yaml`` (optional, shown verbatim). The HTML embeds the PNG as base64 and uses inline
CSS only: no scripts, no external files, so it can be mailed or archived alone.

Drawing uses matplotlib's object API on an Agg canvas (no pyplot state, no
backend switch), at a fixed size so the PNG's pixel size is predictable.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from pipeline.core.atomic import atomic_path, check_replaceable, check_writable, write_text_atomic
from pipeline.core.errors import UserError
from pipeline.core.paths import CONFIG_FILE, EVAL_FILE, REPORT_HTML, REPORT_PNG, TASK_RESULTS  # noqa: E402
from pipeline.trainer.metrics import METRICS_FILE, read_metrics

FIG_INCHES = (16.0, 10.5)
FIG_DPI = 100
PNG_SIZE = (int(FIG_INCHES[0] * FIG_DPI), int(FIG_INCHES[1] * FIG_DPI))
"""(width, height) in pixels of report.png."""

GRID = (3, 4)

CHOSEN_COLOR = "#1b9e77"
REJECTED_COLOR = "#d95f02"
BEFORE_COLOR = "#9e9e9e"
AFTER_COLOR = "#3f51b5"
HELDOUT_COLOR = "#e53935"
"""Held-out (train --eval-every) curves, drawn over the training ones."""
ERRORBAR_COLOR = "#111111"
CI_DIFF_COLOR = "#ef6c00"
"""The paired difference's interval bar in the HTML table (before's and after's are in their bars' colors)."""


class ReportPaths(NamedTuple):
    html: Path
    png: Path


# --- inputs ----------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, as a dict; UserError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return data


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


NOT_HEADLINES = ("intervals", "mc_spread", "record", "reference_margins")
"""eval.json keys that are not rows of numbers: intervals are drawn beside their figures, the record is metadata."""


def eval_rows(data: dict[str, Any], prefix: str = "") -> list[tuple[str, float | None, float | None, float | None]]:
    """Flatten eval.json into (name, before, after, value) rows.

    A dict with "before"/"after" is one comparison row; a bare number is a
    value row; other dicts are groups whose keys are joined with "/"; lists
    and strings are skipped (they are not headline numbers), and so are the
    interval records (``*_interval``, ``intervals``: shown with their figures).
    """
    rows = []
    for key, val in data.items():
        if (not prefix and key in NOT_HEADLINES) or str(key).endswith("_interval"):
            continue
        name = f"{prefix}{key}"
        if isinstance(val, dict):
            if "before" in val or "after" in val:
                before, after = _num(val.get("before")), _num(val.get("after"))
                if before is not None or after is not None:  # e.g. model names are not numbers
                    rows.append((name, before, after, None))
            else:
                rows.extend(eval_rows(val, prefix=f"{name}/"))
        elif _num(val) is not None:
            rows.append((name, None, None, _num(val)))
    return rows


# --- the figure ------------------------------------------------------------


def _series(m: dict[str, list[float]], name: str) -> tuple[list[int], list[float]]:
    points = [(s, v) for s, v in zip(m["step"], m[name]) if v is not None and math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def _plot_lines(ax, m, names_labels_colors, title, absent_if_zero: bool = False):
    drew = 0
    for name, label, color in names_labels_colors:
        xs, ys = _series(m, name)
        if not xs or (absent_if_zero and not any(ys)):  # a loss term logged as 0: the loss has no such term
            continue
        # Markers keep a run of one or a few steps visible.
        marker = "o" if len(xs) <= 40 else None
        ax.plot(xs, ys, label=label, color=color, marker=marker, markersize=4, linewidth=1.5)
        drew += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if not drew:
        _empty(ax, "not in this run's loss" if absent_if_zero else "not logged")
    elif drew > 1:  # a series that was not logged (e.g. no held-out eval) gets no legend entry
        ax.legend(loc="best", fontsize=8)
    return drew > 0


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _count(rec: dict) -> str:
    count = rec.get("count")
    return f"{count:g}/{rec.get('n')}" if isinstance(count, float) else f"{count}/{rec.get('n')}"


PANELS = ("loss (total)", "preference (DPO) term", "NLL term (SFT on chosen)", "learning rate",
          "rewards/accuracies", "rewards/margins", "rewards: chosen vs rejected", "policy ELBO: chosen vs rejected",
          "grad norm", "held-out accuracy: before vs after (95% intervals)", "reference margins (held-out pairs)",
          "tokens per second")
"""The figure's panels, in reading order over GRID (the loss and its two terms first, each on its own scale)."""


def _draw(m, rows, margins, title, intervals=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_INCHES, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    axes = dict(zip(PANELS, fig.subplots(*GRID).ravel()))
    fig.suptitle(title, fontsize=14)
    _draw_training(axes, m)
    _draw_heldout(axes["held-out accuracy: before vs after (95% intervals)"], rows, intervals or {})
    _draw_margins(axes["reference margins (held-out pairs)"], margins)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    return buf.getvalue()


def _draw_training(axes, m) -> None:
    """The panels of the training metrics, each with its held-out line where evaluation logged one."""
    _plot_lines(axes["loss (total)"], m, [("loss", "loss", "#333333"), ("eval/loss", "held-out", HELDOUT_COLOR)],
                "loss (total)")
    # The loss is the preference term plus the weighted SFT term: apart, a rising total (the NLL term growing as
    # the chosen ELBO moves) is not mistaken for the preference term failing.
    _plot_lines(axes["preference (DPO) term"], m, [("preference_loss", "preference term", "#5e35b1"),
                                                   ("eval/preference_loss", "held-out", HELDOUT_COLOR)],
                "preference (DPO) term", absent_if_zero=True)
    _plot_lines(axes["NLL term (SFT on chosen)"], m, [("nll_loss", "NLL of chosen (per token)", "#00897b"),
                                                      ("eval/nll_loss", "held-out", HELDOUT_COLOR)],
                "NLL term (SFT on chosen, unweighted)", absent_if_zero=True)
    ax = axes["learning rate"]
    if _plot_lines(ax, m, [("learning_rate", "learning_rate", "#00897b")], "learning rate"):
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax = axes["rewards/accuracies"]
    if _plot_lines(ax, m, [("rewards/accuracies", "accuracy", "#1565c0"),
                           ("eval/rewards/accuracies", "held-out", HELDOUT_COLOR)], "rewards/accuracies"):
        ax.set_ylim(-0.03, 1.03)
        ax.axhline(0.5, color="#999999", linestyle="--", linewidth=1)
    _plot_lines(axes["rewards/margins"], m, [("rewards/margins", "margin", "#7b1fa2"),
                                             ("eval/rewards/margins", "held-out", HELDOUT_COLOR)], "rewards/margins")
    ax = axes["rewards: chosen vs rejected"]
    if _plot_lines(ax, m, [("rewards/chosen", "chosen", CHOSEN_COLOR), ("rewards/rejected", "rejected", REJECTED_COLOR)],
                   "rewards: chosen vs rejected"):
        ax.axhline(0.0, color="#999999", linewidth=0.8)
    _plot_lines(axes["policy ELBO: chosen vs rejected"], m, [("logps/chosen", "chosen", CHOSEN_COLOR),
                                                             ("logps/rejected", "rejected", REJECTED_COLOR)],
                "policy ELBO: chosen vs rejected")
    _plot_lines(axes["grad norm"], m, [("grad_norm", "grad norm", "#6d4c41")], "grad norm")
    _plot_lines(axes["tokens per second"], m, [("tokens_per_second", "tokens/s", "#546e7a")], "tokens per second")


def _draw_heldout(ax, rows, intervals) -> None:
    """Held-out before/after: only the accuracy-like comparisons share a 0..1 axis; error bars are the 95%
    Wilson intervals, and each figure's label carries the paired after - before difference with its interval."""
    acc = [(n, b, a) for n, b, a, _ in rows if "accuracy" in n and (b is not None or a is not None)]
    ax.set_title("held-out accuracy: before vs after (95% CI)")
    if not acc:
        _empty(ax, "no eval.json")
        return
    xs = range(len(acc))
    width = 0.38
    labels = []
    for x, (name, b, a) in zip(xs, acc):
        rec = intervals.get(name) or {}
        for dx, v, side, color in ((-width / 2, b, "before", BEFORE_COLOR), (width / 2, a, "after", AFTER_COLOR)):
            ci = rec.get(side) if isinstance(rec.get(side), dict) else None
            has_ci = v is not None and ci and _num(ci.get("low")) is not None and _num(ci.get("high")) is not None
            err = [[max(0.0, v - ci["low"])], [max(0.0, ci["high"] - v)]] if has_ci else None
            ax.bar([x + dx], [v or 0.0], width, label=side if x == 0 else None, color=color, yerr=err,
                   capsize=4, error_kw={"ecolor": ERRORBAR_COLOR, "elinewidth": 1.5})
            top = ci["high"] if err else (v or 0.0)
            text = "n/a" if v is None else f"{v:.3f}" + (f"\n{_count(ci)}" if ci else "")
            ax.text(x + dx, top + 0.02, text, ha="center", fontsize=7)
        label = name.replace("_", " ")
        diff = rec.get("difference")
        if isinstance(diff, dict) and _num(diff.get("difference")) is not None:
            label += f"\n\u0394 {diff['difference']:+.3f}\n[{diff['low']:+.3f}, {diff['high']:+.3f}]"
        labels.append(label)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, 1.22)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _draw_margins(ax, margins) -> None:
    """The reference margins of the held-out pairs as a histogram around 0."""
    ax.set_title("reference margins (held-out pairs)")
    if margins:
        ax.hist(margins, bins=min(40, max(5, len(margins) // 5)), color="#78909c")
        ax.axvline(0.0, color="#333333", linewidth=1)
        ax.set_xlabel("B_ref(chosen) - B_ref(rejected)")
    else:
        _empty(ax, "not available")


# --- the page --------------------------------------------------------------


def _fmt(v: float | None) -> str:
    if v is None:
        return "&mdash;"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def _summary(m: dict[str, list[float]]) -> list[tuple[str, str]]:
    steps = m["step"]
    out = [("steps logged", str(len(steps))), ("last step", str(steps[-1]))]
    for name, label in (("loss", "loss"), ("preference_loss", "preference (DPO) term"), ("nll_loss", "NLL term"),
                        ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")):
        ys = _series(m, name)[1] or [None]
        if name in ("preference_loss", "nll_loss") and not any(ys):
            continue  # not logged, or not in this run's loss
        out.append((f"{label} (first &rarr; last)", f"{_fmt(ys[0])} &rarr; {_fmt(ys[-1])}"))
    steps_eval, acc_eval = _series(m, "eval/rewards/accuracies")
    if acc_eval:
        best = max(range(len(acc_eval)), key=lambda i: (acc_eval[i], -i))  # the first best, as --save-best keeps
        out.append(("held-out accuracy (last)", f"{_fmt(acc_eval[-1])} at step {steps_eval[-1]}"))
        out.append(("held-out accuracy (best)", f"{_fmt(acc_eval[best])} at step {steps_eval[best]}"))
    _, tps = _series(m, "tokens_per_second")
    if tps:
        out.append(("tokens/s (mean)", _fmt(sum(tps) / len(tps))))
    _, mem = _series(m, "peak_memory_bytes")
    if mem:
        out.append(("peak memory", f"{max(mem) / 2**30:.2f} GiB"))
    return out


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px auto;max-width:1200px;padding:0 16px;
color:#222;overflow-wrap:anywhere}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px}
.meta{color:#666;font-size:13px}
.headline{background:#eef2fb;border-left:6px solid #3f51b5;padding:12px 16px;margin:16px 0}
.headline .big{font-size:24px;font-weight:600} .headline .sub{font-size:14px;color:#333;margin-top:4px}
table{border-collapse:collapse;font-size:14px;max-width:100%} th,td{border:1px solid #ddd;padding:4px 10px;
text-align:right;vertical-align:top} th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
table.qa{width:100%;table-layout:fixed;font-size:13px} table.qa td,table.qa th{text-align:left}
table.qa .text{white-space:pre-wrap;margin-top:4px;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.ok{color:#1b7e3a;font-weight:600} .bad{color:#c62828;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:10px;font-size:12px;overflow:auto;max-width:100%}
details{margin:12px 0} summary{cursor:pointer;font-weight:600}
.flex{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start} .flex p{flex:1;min-width:280px;margin:0}
small{color:#555} .ci-col{text-align:left}
.track{position:relative;width:200px;height:9px;background:#eeeeee;margin:4px 0}
.track span{position:absolute;top:0;height:9px}
.track i{position:absolute;top:-2px;width:2px;height:13px;background:#111}
.track b{position:absolute;top:-3px;width:1px;height:15px;background:#777}
"""


def _pct(x: float, lo: float, hi: float) -> float:
    return max(0.0, min(100.0, 100.0 * (x - lo) / (hi - lo)))


def _track(value, low, high, color: str, lo: float = 0.0, hi: float = 1.0, title: str = "") -> str:
    """One interval bar: the interval [low, high] in ``color`` on a [lo, hi] track, the value marked (a zero
    line on a difference's track)."""
    left, right = _pct(low, lo, hi), _pct(high, lo, hi)
    zero = f'<b style="left:{_pct(0.0, lo, hi):.2f}%"></b>' if lo < 0 < hi else ""
    return (f'<div class="track" title="{html.escape(title)}">{zero}<span style="left:{left:.2f}%;'
            f'width:{max(right - left, 0.4):.2f}%;background:{color}"></span>'
            f'<i style="left:calc({_pct(value, lo, hi):.2f}% - 1px)"></i></div>')


def _side_cell(v, rec) -> str:
    if v is None or not isinstance(rec, dict) or _num(rec.get("low")) is None:
        return _fmt(v)
    return f"{_fmt(v)}<br><small>{_count(rec)}, 95% CI {rec['low']:.3f}&ndash;{rec['high']:.3f}</small>"


def _change_cell(b, a, diff) -> str:
    if not isinstance(diff, dict) or _num(diff.get("difference")) is None:
        return "&mdash;" if b is None or a is None else f"{a - b:+.4g}"
    return (f"{diff['difference']:+.4g}<br><small>95% CI {diff['low']:+.3f} to {diff['high']:+.3f}, paired "
            f"({html.escape(str(diff.get('method', '')))})</small>")


def _interval_bars(b, a, rec) -> str:
    out = []
    for side, v, color in (("before", b, BEFORE_COLOR), ("after", a, AFTER_COLOR)):
        ci = rec.get(side)
        if v is not None and isinstance(ci, dict) and _num(ci.get("low")) is not None:
            out.append(_track(v, ci["low"], ci["high"], color, title=f"{side}: 95% interval"))
    diff = rec.get("difference")
    if isinstance(diff, dict) and _num(diff.get("difference")) is not None:
        out.append(_track(diff["difference"], diff["low"], diff["high"], CI_DIFF_COLOR, -1.0, 1.0,
                          "after - before: 95% paired interval"))
    return "".join(out)


HEADLINE_FIGURES = ("task_accuracy", "choice_accuracy", "preference_accuracy", "elbo_accuracy")
"""The figure a report leads with: the first of these eval.json holds (task accuracy: the question asked)."""
FIGURE_NAMES = {"task_accuracy": "Task accuracy (held-out questions, greedy)",
                "choice_accuracy": "Multiple-choice accuracy (option ELBO)",
                "preference_accuracy": "Preference accuracy (held-out pairs)",
                "elbo_accuracy": "ELBO accuracy (held-out pairs)"}
QUESTIONS_SHOWN = 4
"""Questions shown answered before and after: those the training changed first (gained, then lost)."""


def _is_main_row(name: str, b, a, v) -> bool:
    """Rows the evaluation table shows open: before/after figures not all zero; counts, settings and zero rows
    are folded below it."""
    return v is None and any(x not in (None, 0.0) for x in (b, a))


def _headline(rows, intervals, spread) -> str:
    e = html.escape
    by_name = {name: (b, a) for name, b, a, v in rows if v is None}
    figure = next((f for f in HEADLINE_FIGURES if f in by_name), None)
    if figure is None:
        return '<div class="headline"><div class="big">No held-out evaluation in this run</div></div>'
    b, a = by_name[figure]
    rec = intervals.get(figure) if isinstance(intervals.get(figure), dict) else {}
    arrow = f"{_fmt3(b)} &rarr; {_fmt3(a)}" if b is not None else f"{_fmt3(a)} (after; no before measured)"
    subs = []
    for side, v in (("before", b), ("after", a)):
        ci = rec.get(side)
        if v is not None and isinstance(ci, dict) and _num(ci.get("low")) is not None:
            subs.append(f"{side} {_count(ci)}, 95% CI {ci['low']:.3f}&ndash;{ci['high']:.3f}")
    diff = rec.get("difference")
    if isinstance(diff, dict) and _num(diff.get("difference")) is not None:
        gained = f", {diff['gained']:g} gained / {diff['lost']:g} lost" if "gained" in diff and "lost" in diff else ""
        subs.append(f"change <b>{diff['difference']:+.3f}</b> (95% CI {diff['low']:+.3f} to {diff['high']:+.3f}, "
                    f"paired on the same items{gained})")
    elif b is not None and a is not None:
        subs.append(f"change {a - b:+.3f} (no interval recorded)")
    for name, by_label in (spread or {}).items():
        for label, sp in by_label.items():
            if isinstance(sp, dict) and sp.get("seeds"):
                subs.append(f"{e(str(name)).replace('_', ' ')} ({e(str(label))}) over {len(sp['seeds'])} mask seeds: "
                            f"mean {sp['mean']:.3f}, sd {sp['sd']:.3f}")
    return (f'<div class="headline"><div class="big">{FIGURE_NAMES[figure]}: {arrow}</div>'
            + "".join(f'<div class="sub">{x}</div>' for x in subs) + "</div>")


def _fmt3(v) -> str:
    return "&mdash;" if v is None else f"{v:.3f}"


def _questions(task_rows: list[dict]) -> str:
    """The same questions answered before and after: gained first, then lost, then the rest, in index order."""
    e = html.escape
    before = {r["index"]: r for r in task_rows if r.get("model") == "before"}
    after = {r["index"]: r for r in task_rows if r.get("model") == "after"}
    both = sorted(set(before) & set(after))
    if not both:
        return ""

    def rank(i):
        return (0 if after[i]["correct"] and not before[i]["correct"] else
                1 if before[i]["correct"] and not after[i]["correct"] else 2, i)
    picked = sorted(both, key=rank)[:QUESTIONS_SHOWN]
    gained = sum(1 for i in both if rank(i)[0] == 0)
    lost = sum(1 for i in both if rank(i)[0] == 1)
    out = [f"<h2>The same questions, before and after</h2><p><small>{len(picked)} of {len(both)} held-out "
           f"questions: the training changed {gained + lost} answers ({gained} now right, {lost} now wrong); "
           "those first.</small></p>",
           '<table class="qa"><colgroup><col style="width:28%"><col style="width:8%"><col style="width:32%">'
           '<col style="width:32%"></colgroup><tr><th>question</th><th>answer</th><th>before</th><th>after</th></tr>']

    def cell(r):
        mark = '<span class="ok">right</span>' if r["correct"] else '<span class="bad">wrong</span>'
        text = str(r.get("completion") or "")
        text = text if len(text) <= 400 else text[:400] + " ..."
        return f"<td>{mark} (answer {e(str(r.get('predicted')))})<div class=\"text\">{e(text)}</div></td>"

    for i in picked:
        q = str(before[i].get("question") or "")
        out.append(f"<tr><td>{e(q if len(q) <= 400 else q[:400] + ' ...')}</td>"
                   f"<td>{e(str(before[i].get('reference')))}</td>{cell(before[i])}{cell(after[i])}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _eval_table(rows, intervals, with_ci: bool, table_id: str = "eval") -> list[str]:
    e = html.escape
    head = "<th>95% intervals</th>" if with_ci else ""
    parts = [f'<table id="{table_id}"><tr><th>metric</th><th>before</th><th>after</th><th>change</th>{head}</tr>']
    for name, b, a, v in rows:
        extra = "<td></td>" if with_ci else ""
        if v is not None:
            parts.append(f"<tr><td>{e(name)}</td><td colspan=\"3\">{_fmt(v)}</td>{extra}</tr>")
            continue
        rec = intervals.get(name) if isinstance(intervals.get(name), dict) else {}
        if with_ci:
            extra = f'<td class="ci-col">{_interval_bars(b, a, rec)}</td>'
        parts.append(f"<tr><td>{e(name)}</td><td>{_side_cell(b, rec.get('before'))}</td>"
                     f"<td>{_side_cell(a, rec.get('after'))}</td>"
                     f"<td>{_change_cell(b, a, rec.get('difference'))}</td>{extra}</tr>")
    parts.append("</table>")
    return parts


def report_title(run_dir: Path, config: dict[str, Any], rows) -> str:
    """What the run is: the method, the model, and the headline figure's before -> after."""
    model = config.get("model") if isinstance(config.get("model"), str) else None
    loss = config.get("loss") or config.get("loss_type")
    terms = loss if isinstance(loss, list) else str(loss).split(",") if loss else []
    method = f"DPO ({', '.join(str(t).strip() for t in terms)})" if terms else "DPO"
    title = f"{method} of {model}" if model else f"{method} run {run_dir.parent.name}/{run_dir.name}".rstrip("/")
    by_name = {name: (b, a) for name, b, a, v in rows if v is None}
    figure = next((f for f in HEADLINE_FIGURES if f in by_name), None)
    if figure is not None:
        b, a = by_name[figure]
        short = figure.replace("_", " ")
        title += f": {short} {b:.3f} \u2192 {a:.3f}" if b is not None and a is not None else (
            f": {short} {a:.3f}" if a is not None else "")
    return title


def _render_html(run_dir: Path, png: bytes, m, rows, config_text: str | None, intervals=None, *,
                 title: str = "", task_rows: list[dict] | None = None, spread=None) -> str:
    e = html.escape
    intervals = intervals or {}
    title = title or f"lldm-dpo run {run_dir.name}"
    lead = {name: i for i, name in enumerate(HEADLINE_FIGURES)}  # the headline's figure first, then accuracies
    main = sorted((r for r in rows if _is_main_row(*r)), key=lambda r: lead.get(r[0], len(lead)))
    folded = [r for r in rows if not _is_main_row(*r)]
    with_ci = any(name in intervals for name, *_ in main)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<div class="meta">lldm-dpo report &middot; {e(str(run_dir))} &middot; generated '
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</div>",
        _headline(rows, intervals, spread),
    ]
    if rows:
        parts += _eval_table(main, intervals, with_ci)
        if with_ci:
            parts.append("<p><small>Counts are items credited / items (a tie counts one half); intervals are 95% "
                         "Wilson score intervals, and the change's is Newcombe's paired interval on the same "
                         "items.</small></p>")
    else:
        parts.append(f"<p>No {EVAL_FILE} in the run directory.</p>")
    parts.append(_questions(task_rows or []))
    parts += ["<h2>Training</h2>", '<div class="flex"><table>']
    parts += [f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in _summary(m)]
    parts += ["</table><p><small>The loss is the preference (DPO) term plus the weighted NLL term on the chosen "
              "response (TRL's rpo_alpha): they are drawn apart, so the total rising with the NLL term is not the "
              "preference term failing.</small></p></div>",
              f'<img alt="training curves" width="{PNG_SIZE[0]}" height="{PNG_SIZE[1]}" '
              f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">']
    if folded:
        parts.append(f"<details><summary>Other figures ({len(folded)}: counts, settings and zero rows)</summary>")
        parts += _eval_table(folded, intervals, False, "eval-other")
        parts.append("</details>")
    if config_text is not None:
        parts.append(f"<details><summary>Run configuration ({CONFIG_FILE}, {len(config_text.splitlines())} lines)"
                     f"</summary><pre>{e(config_text)}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(
    run_dir: str | Path,
    out_html: str | Path | None = None,
    out_png: str | Path | None = None,
    *,
    ref_margins: Sequence[float] | None = None,
) -> ReportPaths:
    """Write report.png and report.html for a run (default: inside ``run_dir``).

    ``ref_margins``: reference margins of the training pairs for the histogram
    panel; by default taken from eval.json's ``reference_margins`` list if any.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    png_path = Path(out_png) if out_png is not None else run_dir / REPORT_PNG
    html_path = Path(out_html) if out_html is not None else run_dir / REPORT_HTML
    for path in (png_path, html_path):
        check_writable(path, "report")
        check_replaceable(path, "report path")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.exists():
        raise UserError(f"{run_dir}: no {METRICS_FILE} (train writes it); nothing to report")
    table = read_metrics(metrics_path)
    if table.num_rows == 0:
        raise UserError(f"{metrics_path}: no rows; nothing to report")
    m = {name: table.column(name).to_pylist() for name in table.column_names}
    data = read_json_object(run_dir / EVAL_FILE) if (run_dir / EVAL_FILE).exists() else {}
    rows = eval_rows(data)
    intervals = data.get("intervals") if isinstance(data.get("intervals"), dict) else {}
    if ref_margins is None:
        ref_margins = data.get("reference_margins") if isinstance(data.get("reference_margins"), list) else []
    margins = [float(x) for x in ref_margins if _num(x) is not None]
    config_path = run_dir / CONFIG_FILE
    config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.exists() else None

    config = _config_mapping(config_text)
    title = report_title(run_dir, config, rows)
    png = _draw(m, rows, margins, title, intervals)
    with atomic_path(png_path) as tmp:  # recorded: a rerun replaces it, a user's file there is refused
        tmp.write_bytes(png)
    task_rows = _task_rows(run_dir / TASK_RESULTS)
    spread = data.get("mc_spread") if isinstance(data.get("mc_spread"), dict) else {}
    write_text_atomic(html_path, _render_html(run_dir, png, m, rows, config_text, intervals, title=title,
                                              task_rows=task_rows, spread=spread))
    return ReportPaths(html=html_path, png=png_path)


def _config_mapping(text: str | None) -> dict[str, Any]:
    """config.yaml as a mapping (for the title); {} when absent or not a mapping."""
    if not text:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _task_rows(path: Path) -> list[dict]:
    """eval's per-question records (task_results.parquet), [] when absent or unreadable."""
    if not path.is_file():
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException):
        return []


# --- iterative rounds ------------------------------------------------------

ROUNDS_FIG_INCHES = (7.0, 4.5)


def rounds_png(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """A line plot of task accuracy per round (rows of ``ROUNDS_SCHEMA``; round 0 the original model), the
    95% Wilson interval of each as an error bar and its count beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=ROUNDS_FIG_INCHES, dpi=FIG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    pts = [r for r in rows if _num(r.get("task_accuracy")) is not None]
    if pts:
        xs = [r["round"] for r in pts]
        ys = [r["task_accuracy"] for r in pts]
        err = [[max(0.0, y - (r.get("task_low") if r.get("task_low") is not None else y)) for y, r in zip(ys, pts)],
               [max(0.0, (r.get("task_high") if r.get("task_high") is not None else y) - y) for y, r in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, color=AFTER_COLOR, ecolor=ERRORBAR_COLOR, marker="o", capsize=4)
        for x, y, r in zip(xs, ys, pts):
            if r.get("task_n"):
                ax.annotate(f"{r['task_correct']:g}/{r['task_n']}", (x, y), textcoords="offset points",
                            xytext=(8, 4), fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(["0 (original)" if x == 0 else str(x) for x in xs])
        ax.set_xlim(min(xs) - 0.3, max(xs) + 0.5)
        ax.set_ylim(0, min(1.0, max(0.1, 1.25 * max(y + e for y, e in zip(ys, err[1])))))
        ax.grid(True, axis="y", alpha=0.3)
    else:
        _empty(ax, "no task accuracy yet")
    ax.set_xlabel("round")
    ax.set_ylabel("task accuracy (95% Wilson interval)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI)
    return buf.getvalue()
