"""The run report: a PNG of the expected size with drawn panels, and a self-contained HTML page."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.report.visual import (
    CHOSEN_COLOR,
    GRID,
    PANELS,
    PNG_SIZE,
    REJECTED_COLOR,
    ReportPaths,
    eval_rows,
    write_report,
)
from pipeline.trainer.metrics import MetricsWriter

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "screenshot_report.sh"


def _run_dir(tmp_path, steps=30, eval_data=None, config=None):
    run = tmp_path / "run"
    with MetricsWriter(run, tensorboard=False, console=False) as w:
        for s in range(1, steps + 1):
            w.log({
                "step": s, "epoch": s / steps, "loss": 0.69 * math.exp(-s / 10),
                "rewards/chosen": 0.02 * s, "rewards/rejected": -0.03 * s,
                "rewards/accuracies": min(1.0, 0.5 + s / 40), "rewards/margins": 0.05 * s,
                "logps/chosen": -40.0 + 0.1 * s, "logps/rejected": -45.0 - 0.2 * s,
                "learning_rate": 1e-4 * (1 - s / (steps + 1)), "grad_norm": 1.0 + 1.0 / s,
                "tokens_per_second": 900.0, "peak_memory_bytes": 1.5 * 2**30,
            })
    if eval_data is not None:
        (run / "eval.json").write_text(json.dumps(eval_data))
    if config is not None:
        (run / "config.yaml").write_text(config)
    return run


def _cells(img: np.ndarray):
    """The GRID cells of the figure (below the title band), each as an array."""
    h, w = img.shape[:2]
    top = int(h * 0.05)
    rows, cols = GRID
    ch, cw = (h - top) // rows, w // cols
    for r in range(rows):
        for c in range(cols):
            yield img[top + r * ch: top + (r + 1) * ch, c * cw: (c + 1) * cw]


def _check_png(path: Path):
    with Image.open(path) as im:
        im.verify()  # a structurally valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == PNG_SIZE
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.var() > 100.0  # not blank
    # Every panel has something drawn (axes, text, curves), not just page background.
    for cell in _cells(pixels):
        assert (cell < 128).mean() > 0.002
    return pixels


EVAL = {
    "preference_accuracy": {"before": 0.5, "after": 0.875},
    "task_accuracy": {"after": 0.3125},  # the 'before' is missing: shown as a dash
    "mean_margin": {"before": -0.25, "after": 1.75},
    "n_eval_pairs": 64,
    "notes": "free text is not a number",
    "reference_margins": [(-1) ** i * (i % 7) * 0.5 for i in range(200)],
}


def test_report_png_and_html(tmp_path):
    run = _run_dir(tmp_path, eval_data=EVAL, config="beta: 0.1\nloss: sigmoid  # <b>raw</b> & more\n")
    paths = write_report(run)
    assert paths == ReportPaths(html=run / "report.html", png=run / "report.png")
    pixels = _check_png(paths.png)

    page = paths.html.read_text(encoding="utf-8")
    # The PNG is embedded byte for byte, and nothing is fetched from elsewhere.
    (b64,) = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(b64) == paths.png.read_bytes()
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    # The eval numbers, with change where both sides exist.
    for text in ("preference_accuracy", "0.5", "0.875", "+0.375", "task_accuracy", "0.3125",
                 "mean_margin", "-0.25", "1.75", "+2", "n_eval_pairs", "64"):
        assert text in page, text
    assert "free text" not in page  # strings are not headline numbers
    # The config, escaped.
    assert "beta: 0.1" in page and "&lt;b&gt;raw&lt;/b&gt; &amp; more" in page and "<b>raw</b>" not in page
    # The summary: first -> last of the training curves.
    assert "steps logged</td><td>30<" in page
    assert pixels.shape == (PNG_SIZE[1], PNG_SIZE[0])
    # The chosen-vs-rejected panel holds both curves, in their colours.
    rgb = np.asarray(Image.open(paths.png).convert("RGB"), dtype=np.int64)
    panel = list(_cells(rgb))[PANELS.index("rewards: chosen vs rejected")]
    for color in (CHOSEN_COLOR, REJECTED_COLOR):
        target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(panel - target).sum(axis=-1) < 30).sum() > 200, color


def test_single_row_and_no_eval(tmp_path):
    run = _run_dir(tmp_path, steps=1)
    paths = write_report(run, out_html=tmp_path / "o" / "r.html", out_png=tmp_path / "o" / "r.png")
    assert paths.html == tmp_path / "o" / "r.html" and not (run / "report.html").exists()
    _check_png(paths.png)
    page = paths.html.read_text(encoding="utf-8")
    assert "No eval.json" in page
    assert "config.yaml" not in page


def test_eval_panel_changes_with_eval_json(tmp_path):
    """The before/after and histogram panels really draw the eval data (not a fixed picture)."""
    run = _run_dir(tmp_path, steps=5)
    without = np.asarray(Image.open(write_report(run).png).convert("L"), dtype=np.float64)
    (run / "eval.json").write_text(json.dumps(EVAL))
    with_eval = np.asarray(Image.open(write_report(run).png).convert("L"), dtype=np.float64)
    cells_a, cells_b = list(_cells(without)), list(_cells(with_eval))
    # Bars and histogram add dark/coloured area to their panels.
    for i in (PANELS.index("held-out accuracy: before vs after (95% intervals)"),
              PANELS.index("reference margins (held-out pairs)")):
        assert (cells_b[i] < 200).mean() > (cells_a[i] < 200).mean() + 0.02


def test_eval_rows_flatten_groups_and_missing_keys():
    rows = eval_rows({
        "preference_accuracy": {"before": 0.5},
        "task": {"gsm8k": {"before": 0.1, "after": 0.2}, "count": 10},
        "bad": {"before": "x", "after": float("nan")},
        "list": [1, 2],
    })
    assert rows == [
        ("preference_accuracy", 0.5, None, None),
        ("task/gsm8k", 0.1, 0.2, None),
        ("task/count", None, None, 10.0),
    ]  # "bad" has no number on either side (like eval.json's model names): no row


def test_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        write_report(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="metrics.parquet"):
        write_report(tmp_path / "empty")
    run = _run_dir(tmp_path, steps=2)
    (run / "eval.json").write_text("{not json")
    with pytest.raises(UserError, match="eval.json"):
        write_report(run)
    (run / "eval.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        write_report(run)


# --- the screenshot script ---------------------------------------------------


def _stub_browser(dir_: Path) -> Path:
    """A fake 'chromium' that honours --screenshot= by writing a PNG of --window-size."""
    stub = dir_ / "chromium"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import sys\nfrom PIL import Image\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)\n"
        "assert sys.argv[-1].startswith('file:///'), sys.argv\n"
        "w, h = map(int, args['window-size'].split(','))\n"
        "Image.new('RGB', (w, h), (200, 10, 10)).save(args['screenshot'])\n"
    )
    stub.chmod(0o755)
    return stub


def test_screenshot_script_with_stub_browser(tmp_path):
    run = _run_dir(tmp_path, steps=3)
    html_path = write_report(run).html
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _stub_browser(bindir)
    env = {**os.environ, "CHROMIUM": str(bindir / "chromium")}
    out = tmp_path / "shot.png"
    proc = subprocess.run(["bash", str(SCRIPT), str(html_path), str(out), "640", "480"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert Image.open(out).size == (640, 480)


def test_screenshot_script_skips_without_browser(tmp_path):
    run = _run_dir(tmp_path, steps=2)
    html_path = write_report(run).html
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if any(shutil.which(b, path=env["PATH"]) for b in ("chromium", "chromium-browser", "google-chrome",
                                                         "google-chrome-stable", "chrome", "headless_shell")):
        pytest.skip("a Chromium is installed here; the absent case cannot be shown")
    proc = subprocess.run(["bash", str(SCRIPT), str(html_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "skipped" in proc.stderr
    assert not (run / "report.screenshot.png").exists()


def _eval_with_intervals():
    from pipeline.evaluation.intervals import credits_record, paired_difference_interval

    pref_b, pref_a = [0.5] * 16, [1, 1, 0.5, 1, 0, 1, 1, 1, 0.5, 1, 1, 0, 1, 1, 1, 1]
    mc_b, mc_a = [1, 0, 0, 1, 0, 0, 0, 0] * 4, [1, 1, 0, 1, 0, 0, 1, 0] * 4
    return {
        **EVAL,
        "preference_accuracy": {"before": 0.5, "after": sum(pref_a) / 16},
        "choice_accuracy": {"before": sum(mc_b) / 32, "after": sum(mc_a) / 32},
        "intervals": {
            "preference_accuracy": {"before": credits_record(pref_b), "after": credits_record(pref_a),
                                    "difference": paired_difference_interval(pref_b, pref_a)},
            "choice_accuracy": {"before": credits_record(mc_b), "after": credits_record(mc_a),
                                "difference": paired_difference_interval(mc_b, mc_a)},
        },
    }


def test_intervals_are_drawn_and_tabled(tmp_path):
    """Every accuracy with an interval record gets error bars in the PNG and its count, Wilson interval and
    interval bar in the page; the before/after change its paired interval."""
    data = _eval_with_intervals()
    plain = {k: v for k, v in data.items() if k != "intervals"}
    a = _run_dir(tmp_path / "a", steps=5, eval_data=plain)
    b = _run_dir(tmp_path / "b", steps=5, eval_data=data)
    pa, pb = (np.asarray(Image.open(write_report(r).png).convert("RGB"), dtype=np.int64) for r in (a, b))
    cells_a, cells_b = list(_cells(pa)), list(_cells(pb))
    # The before/after panel gains dark error bars, count labels and the differences under the figures.
    bars = PANELS.index("held-out accuracy: before vs after (95% intervals)")
    dark = [(c.sum(axis=-1) < 90).sum() for c in (cells_a[bars], cells_b[bars])]
    assert dark[1] > dark[0] + 150
    page = (b / "report.html").read_text(encoding="utf-8")
    ci = data["intervals"]["choice_accuracy"]
    assert f"8/32, 95% CI {ci['before']['low']:.3f}&ndash;{ci['before']['high']:.3f}" in page
    assert f"16/32, 95% CI {ci['after']['low']:.3f}&ndash;{ci['after']['high']:.3f}" in page
    d = ci["difference"]
    assert f"+0.25<br><small>95% CI {d['low']:+.3f} to {d['high']:+.3f}, paired (newcombe-paired-score)" in page
    assert page.count('class="track"') == 6  # before, after and difference bars of the two figures
    assert "<th>95% intervals</th>" in page and "intervals/" not in page  # records are not rows of their own
    assert "95% intervals" not in (a / "report.html").read_text(encoding="utf-8")


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _full_run(tmp_path):
    """A run as `lldm-dpo run` leaves it: metrics with the loss's two terms, eval.json with intervals, counts and
    settings, task_results.parquet of both models, a long config.yaml."""
    import pyarrow as pa

    from pipeline.evaluation.intervals import credits_record, paired_difference_interval

    b, a = [1, 0, 0, 1, 0, 0, 0, 0] * 25, [1, 1, 0, 1, 0, 0, 1, 0] * 25
    data = _eval_with_intervals()
    data["task_accuracy"] = {"before": sum(b) / 200, "after": sum(a) / 200}
    data["intervals"]["task_accuracy"] = {"before": credits_record(b), "after": credits_record(a),
                                          "difference": paired_difference_interval(b, a)}
    data["counts"] = {"choice_items": 0, "task_items": 200}
    data["sampler"] = {"block_length": 32, "gen_length": 64}
    config = "model: skill\nloss: [sigmoid, sft]\nbeta: 0.1\n" + "".join(f"key_{i}: {i}\n" for i in range(60))
    run = _run_dir(tmp_path, eval_data=data, config=config)
    with MetricsWriter(run, tensorboard=False, console=False) as w:  # the same run, its loss terms logged
        for row in pq.read_table(run / "metrics.parquet").to_pylist():
            row.update(preference_loss=row["loss"] * 0.8, nll_loss=0.4 + 0.01 * row["step"])
            w.log(row)
    rows = [{"model": label, "index": i, "question": f"Question {i}: how many apples are there in {i} baskets "
             "of twelve apples each, if three are eaten?", "reference": str(12 * i - 3),
             "completion": "Twelve apples per basket.\n" * (1 + i % 3) + ("x" * 90 if i == 1 else ""),
             "predicted": str(12 * i - 3 if c else 12 * i), "correct": bool(c)}
            for label, cs in (("before", b), ("after", a)) for i, c in enumerate(cs)]
    pq.write_table(pa.Table.from_pylist(rows), run / "task_results.parquet")
    return run, data


def test_report_leads_with_the_headline_then_the_questions_then_the_curves(tmp_path):
    run, data = _full_run(tmp_path)
    page = write_report(run).html.read_text(encoding="utf-8")
    title = "DPO (sigmoid, sft) of skill: task accuracy 0.250 \u2192 0.500"
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page
    order = [page.index(x) for x in ('class="headline"', "Task accuracy (held-out questions, greedy): 0.250 &rarr; "
                                     "0.500", '<table id="eval">', "The same questions, before and after",
                                     "<h2>Training</h2>", 'alt="training curves"', '<table id="eval-other">',
                                     "Run configuration (config.yaml, 63 lines)")]
    assert order == sorted(order), order
    d = data["intervals"]["task_accuracy"]["difference"]
    assert f"change <b>{d['difference']:+.3f}</b> (95% CI {d['low']:+.3f} to {d['high']:+.3f}" in page
    assert "50/200, 95% CI" in page and "50 gained / 0 lost" in page
    # zero and count rows are folded below the curves; the main table holds the figures
    main = page[page.index('<table id="eval">'):page.index("</table>", page.index('<table id="eval">'))]
    assert "counts/choice_items" not in main and "sampler/block_length" not in main and "task_accuracy" in main
    folded = page[page.index("<details><summary>Other figures"):]
    assert "counts/choice_items" in folded and "sampler/block_length" in folded
    assert "<details><summary>Run configuration" in page and "key_59: 59" in page  # folded, not dropped
    # the same questions before and after: those the training changed (gained here) first
    qa = page[page.index('<table class="qa">'):page.index("</table>", page.index('<table class="qa">'))]
    assert qa.count("<tr>") == 1 + 4 and qa.count(">wrong</span>") == 4 and qa.count(">right</span>") == 4
    assert "Question 1: how many" in qa and "Question 6: how many" in qa and "Question 0:" not in qa


def test_the_loss_terms_are_drawn_apart(tmp_path):
    """The DPO and NLL terms each get their panel; a run whose loss has no NLL term says so there."""
    run, _ = _full_run(tmp_path / "a")
    plain = _run_dir(tmp_path / "b")  # metrics without the terms (written before they were logged)
    a = list(_cells(np.asarray(Image.open(write_report(run).png).convert("L"), dtype=np.float64)))
    b = list(_cells(np.asarray(Image.open(write_report(plain).png).convert("L"), dtype=np.float64)))
    for name in ("preference (DPO) term", "NLL term (SFT on chosen)"):
        i = PANELS.index(name)
        assert (a[i] < 160).mean() > (b[i] < 160).mean() + 0.005, name  # a curve where the other says "not logged"
    page = (plain / "report.html").read_text(encoding="utf-8")
    assert "<title>DPO run b/run</title>" in page  # no config.yaml: the method and the folder


def _chromium() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _layout(html_path: Path, tmp_path: Path, width: int) -> dict:
    """Where a browser of ``width`` px lays the page out: a copy of the page with a script reading the layout
    into its title (the report itself has no script), read back with --dump-dom."""
    probe = tmp_path / "probe.html"
    script = ("<script>var r=function(s){var e=document.querySelector(s);return e?e.getBoundingClientRect():null};"
              "document.title=JSON.stringify({scroll:document.documentElement.scrollWidth,"
              "client:document.documentElement.clientWidth,headline:r('.headline'),qa:r('table.qa'),"
              "chart:r('img'),eval:r('#eval')});</script>")
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", script + "</body>"),
                     encoding="utf-8")
    profile = tmp_path / "profile"
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
                           f"--window-size={width},900", "--dump-dom", f"file://{probe}"],
                          capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", proc.stdout, re.S)
    assert title, proc.stderr[-2000:]
    return json.loads(title.group(1).replace("&quot;", '"'))


@pytest.mark.skipif(not any(shutil.which(b) for b in BROWSERS) and not os.environ.get("LLDM_DPO_REQUIRE_CHROMIUM"),
                    reason="headless Chromium not installed (Debian package 'chromium'; .ci/run installs it)")
def test_screenshot_in_real_chromium(tmp_path):
    """The page as a real browser lays it out in a 1,280 px window: nothing wider than the window (no horizontal
    scrollbar), the headline first on screen, the questions and the chart below it, the chart as report.png
    draws it (scaled to the page), and the interval bars at the widths their intervals give."""
    from pipeline.report.visual import AFTER_COLOR, CI_DIFF_COLOR

    run, data = _full_run(tmp_path)
    paths = write_report(run)
    out = tmp_path / "shot.png"
    proc = subprocess.run(["bash", str(SCRIPT), str(paths.html), str(out), "1280", "2400"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stderr, proc.stderr  # LLDM_DPO_REQUIRE_CHROMIUM: CI has the browser
    layout = _layout(paths.html, tmp_path, 1280)
    assert layout["scroll"] <= layout["client"] <= 1280, layout  # no horizontal scrollbar
    assert layout["headline"]["top"] < 150 and layout["headline"]["right"] <= 1280, layout
    assert layout["headline"]["top"] < layout["eval"]["top"] < layout["qa"]["top"] < layout["chart"]["top"]
    assert layout["qa"]["right"] <= 1280 and layout["chart"]["right"] <= 1280, layout
    with Image.open(out) as im:
        assert im.size == (1280, 2400)
        shot = np.asarray(im.convert("RGB"), dtype=np.int64)
    # the headline's band is on screen at the top, in its colour
    band = shot[int(layout["headline"]["top"]) + 2:int(layout["headline"]["bottom"]) - 2]
    assert (np.abs(band - np.array([0xEE, 0xF2, 0xFB])).sum(axis=-1) < 6).mean() > 0.5
    # the chart where the layout puts it, as report.png draws it at that size (a little resampling allowed)
    c = layout["chart"]
    x0, y0, w, h = (int(round(c[k])) for k in ("left", "top", "width", "height"))
    assert y0 + h <= shot.shape[0], "the chart is below the screenshot"
    shown = Image.fromarray(shot[y0 + 1:y0 + h - 1, x0 + 1:x0 + w - 1].astype(np.uint8)).convert("L")
    chart = Image.open(paths.png).convert("L").resize(shown.size, Image.Resampling.BILINEAR)
    small = (shown.size[0] // 4, shown.size[1] // 4)
    diff = np.abs(np.asarray(shown.resize(small), dtype=np.float64) - np.asarray(chart.resize(small), dtype=np.float64))
    assert diff.mean() < 6.0, diff.mean()
    page = shot[:y0]

    def runs(color):
        target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        hit = np.abs(page - target).sum(axis=-1) < 12
        widths = set()
        for r in hit:
            xs = np.flatnonzero(r)
            if len(xs):
                splits = np.split(xs, np.flatnonzero(np.diff(xs) > 3) + 1)  # the value marker may cut a bar
                widths.update(int(s[-1] - s[0] + 1) for s in splits)
        return widths

    after, diff_bars = runs(AFTER_COLOR), runs(CI_DIFF_COLOR)
    for name in ("preference_accuracy", "choice_accuracy", "task_accuracy"):
        rec = data["intervals"][name]
        want_after = 200 * (rec["after"]["high"] - rec["after"]["low"])
        want_diff = 200 * (rec["difference"]["high"] - rec["difference"]["low"]) / 2
        assert any(abs(w - want_after) <= 2 for w in after), (name, want_after, sorted(after))
        assert any(abs(w - want_diff) <= 2 for w in diff_bars), (name, want_diff, sorted(diff_bars))
    Image.fromarray(shot.astype(np.uint8)).save(tmp_path / "checked.png")


def test_report_command_through_typer(tmp_path):
    import typer
    from typer.testing import CliRunner

    from stages.report import command

    app = typer.Typer()
    app.command("report")(command)
    app.command("other")(lambda: None)  # two commands, so "report" is addressed by name as in the CLI
    run = _run_dir(tmp_path, steps=2)
    res = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out == {"html": str(run / "report.html"), "png": str(run / "report.png")}
    assert Path(out["png"]).exists()


def test_held_out_metrics_are_drawn_and_summarised(tmp_path):
    """train --eval-every's eval/... columns: curves over the training ones, last and best in the summary."""
    plain = _run_dir(tmp_path / "a", steps=12)
    held = tmp_path / "b" / "run"
    with MetricsWriter(held, tensorboard=False, console=False) as w:
        for row in pq.read_table(plain / "metrics.parquet").to_pylist():
            s = row["step"]
            if s % 4 == 0:  # evaluated every 4 steps: best 0.75 first reached at step 8
                row.update({"eval/loss": 0.9 - 0.01 * s, "eval/rewards/accuracies": {4: 0.25, 8: 0.75, 12: 0.75}[s],
                            "eval/rewards/margins": -0.5 + 0.2 * s})
            w.log(row)
    a = list(_cells(np.asarray(Image.open(write_report(plain).png).convert("L"), dtype=np.float64)))
    b = list(_cells(np.asarray(Image.open(write_report(held).png).convert("L"), dtype=np.float64)))
    for name in ("loss (total)", "rewards/margins", "rewards/accuracies"):  # a held-out curve was added
        assert not np.array_equal(a[PANELS.index(name)], b[PANELS.index(name)]), name
    assert np.array_equal(a[PANELS.index("learning rate")], b[PANELS.index("learning rate")])  # no held-out curve
    page = (held / "report.html").read_text(encoding="utf-8")
    assert "<td>held-out accuracy (best)</td><td>0.75 at step 8</td>" in page
    assert "<td>held-out accuracy (last)</td><td>0.75 at step 12</td>" in page
    assert "held-out accuracy" not in (plain / "report.html").read_text(encoding="utf-8")
