"""report.html: contents from a run directory (metrics table, curves, scatter, length
histograms, samples), robustness to partial runs, escaping, valid SVG, and a render in a
real headless browser (Chromium; skipped when it is not installed)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from starpo import report as R
from starpo.report import charts as C
from starpo.report import run_page as RP

MODELS = ["sft", "dpo", "simpo"]


def _jsonl(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _curves(path: Path, steps: int, keys: dict, seed: int) -> None:
    rng = random.Random(seed)
    recs = []
    for s in range(10, steps + 1, 10):
        rec = {"step": s, "epoch": s / steps, "elapsed_s": s * 0.1}
        for k, (a, b) in keys.items():
            rec[k] = a + (b - a) * s / steps + rng.uniform(-0.05, 0.05) * abs(b - a + 0.1)
        recs.append(rec)
    _jsonl(path, recs)


def make_run(d: Path, *, with_eval: bool = True) -> Path:
    import yaml
    stages = [{"type": "sft", "data": {"sources": [{"path": "world:sft"}]}},
              {"type": "dpo", "data": {"sources": [{"path": "world:preference"}]}},
              {"type": "dpo", "name": "simpo", "loss": "simpo",
               "data": {"sources": [{"path": "world:preference"}]}}]
    if with_eval:
        stages.append({"type": "eval", "data": {"sources": [{"path": "world:eval"}]}})
    d.mkdir(parents=True, exist_ok=True)
    (d / "recipe.yaml").write_text(yaml.safe_dump({"name": "demo <run>", "stages": stages}))
    _curves(d / "sft" / "metrics.jsonl", 400, {"loss": (3.5, 1.1), "lr": (2e-3, 1e-5),
                                               "grad_norm": (2.0, 0.4),
                                               "tokens_per_s": (900, 1000)}, 0)
    pref = {"loss": (0.69, 0.45), "reward_accuracy": (0.5, 0.8), "reward_margin": (0, 1.2),
            "reward_chosen": (0, 0.4), "reward_rejected": (0, -0.8), "logp_chosen": (-40, -35),
            "logp_rejected": (-45, -55), "len_chosen": (12, 12), "len_rejected": (13, 13)}
    _curves(d / "dpo" / "metrics.jsonl", 120, pref, 1)
    _curves(d / "simpo" / "metrics.jsonl", 120, pref, 2)
    with (d / "dpo" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 130, "loss": 0.4')  # a line cut by a kill
    for name, steps in (("sft", 400), ("dpo", 120), ("simpo", 120)):
        (d / name / "stage.json").write_text(json.dumps(
            {"complete": True, "steps": steps, "seconds": 12.5,
             "final": {"loss": 0.5, "reward_accuracy": 0.75}}))
    if not with_eval:
        return d
    rng = random.Random(0)
    base_len = {"sft": 18, "dpo": 24, "simpo": 11}
    summary = {}
    for k, name in enumerate(MODELS):
        recs = []
        for i in range(40):
            n = max(0, int(rng.gauss(base_len[name], 4)))
            score = round(rng.uniform(-1, 1), 2)
            recs.append({"id": f"p{i}", "prompt": [{"role": "user",
                                                    "content": f"Question {i} <b>&</b>?"}],
                         "response": f"{name} answer {i} <script>alert(1)</script> " * 2,
                         "score": score, "length": n, "n_tokens": n + 1,
                         "finished": i % 7 != 0, "chosen": f"reference {i}",
                         "chosen_score": 0.1, "kl": 0.0 if name == "sft" else 2.0 + k})
        _jsonl(d / "eval" / f"{name}.jsonl", recs)
        mean = sum(r["score"] for r in recs) / len(recs)
        summary[name] = {
            "n": 40, "mean_score": mean, "mean_score_ci": [mean - 0.1, mean + 0.1],
            "win_vs_chosen": 0.4 + 0.1 * k, "win_vs_chosen_ci": [0.3 + 0.1 * k, 0.5 + 0.1 * k],
            "tie_vs_chosen": 0.1,
            "win_vs_sft": 0.5 + 0.08 * k, "win_vs_sft_ci": [0.45 + 0.08 * k, 0.55 + 0.08 * k],
            "tie_vs_sft": 1.0 if name == "sft" else 0.2,
            "kl_vs_sft": 0.0 if name == "sft" else 2.0 + k,
            "kl_vs_sft_ci": [0.0, 0.0] if name == "sft" else [1.5 + k, 2.5 + k],
            "kl_vs_sft_per_token": 0.0 if name == "sft" else 0.1 * k,
            "mean_length": sum(r["length"] for r in recs) / 40, "mean_length_ci": [10, 30],
        }
    (d / "eval" / "summary.json").write_text(json.dumps(summary))
    (d / "eval" / "meta.json").write_text(json.dumps(
        {"prompts": 40, "reference": "sft", "seed": 0, "bootstrap": 1000, "judge": "gold",
         "generation": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256},
         "files": {n: f"{n}.jsonl" for n in MODELS}}))
    (d / "eval" / "gaps.json").write_text(json.dumps([
        {"model": "dpo", "baseline": "sft", "n": 40, "gap": 0.1, "gap_ci": [0.04, 0.16]},
        {"model": "simpo", "baseline": "dpo", "n": 40, "gap": -0.02, "gap_ci": [-0.09, 0.05]},
        {"model": "simpo", "baseline": "sft", "n": 40, "gap": -0.08, "gap_ci": [-0.15, -0.01]},
        {"model": "broken"}]))
    (d / "eval" / "stage.json").write_text(json.dumps({"complete": True, "seconds": 3.0}))
    return d


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


# =========================================================================== contents


def test_full_report_contents(tmp_path):
    run = make_run(tmp_path / "run")
    path = R.write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # self-contained: no scripts, no external resources
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    # escaped user text (the run name, prompts, responses)
    assert "demo &lt;run&gt;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # metrics table: one row per model with values and intervals
    table = re.search(r'<table class="metrics">.*?</table>', page, flags=re.S).group(0)
    assert table.count("<tr>") == 1 + len(MODELS)
    for name in MODELS:
        assert f"{name}</th>" in table or f"{name} <span" in table
    for header in ("mean score", "win vs chosen", "win vs SFT", "KL vs SFT", "KL / token",
                   "mean length"):
        assert header in table
    assert "[2.50, 3.50]" in table and "[10.0, 30.0]" in table
    assert "ties 20%" in table and 'class="best"' in table
    # paired gaps (gaps.json): one row each, with the interval and what it says
    gaps = re.search(r"Score gaps.*?</table>", page, flags=re.S).group(0)
    assert gaps.count("<tr>") == 1 + 3
    assert "dpo − sft</th><td><span class=\"v\">+0.100</span>" in gaps
    assert "[+0.040, +0.160]</span></td><td>higher" in gaps
    assert "simpo − dpo" in gaps and "not distinguishable" in gaps
    assert "simpo − sft" in gaps and "lower" in gaps
    svgs = _svgs(page)
    kinds = [re.search(r'class="chart ([\w-]+)"', s).group(1) for s in svgs]
    assert kinds.count("scatter-chart") == 1
    assert kinds.count("hist-chart") == len(MODELS)
    # sft: loss, grad_norm, lr, tokens_per_s; dpo and simpo: loss, reward_accuracy,
    # reward_margin, and the chosen/rejected pairs drawn together (3 charts, not 6)
    assert kinds.count("line-chart") == 4 + 6 + 6
    for s in svgs:  # every plot is well-formed XML
        ET.fromstring(s)
    scatter = svgs[kinds.index("scatter-chart")]
    assert scatter.count('class="pt"') == len(MODELS) and "simpo" in scatter
    # samples side by side: 4 prompts, each with the reference and every model
    assert page.count('class="sample"') == 4
    assert page.count('class="card ref"') == 4
    assert "cut at max tokens" in page
    # stages table shows every stage and the eval stage's status
    stages = re.search(r'<table class="stages">.*?</table>', page, flags=re.S).group(0)
    for name in ("sft", "dpo", "simpo", "eval"):
        assert f"<th>{name}</th>" in stages


def test_sft_only_run_without_eval(tmp_path):
    run = make_run(tmp_path / "run", with_eval=False)
    shutil.rmtree(run / "dpo")
    shutil.rmtree(run / "simpo")
    page = R.write_report(run).read_text()
    assert "has no evaluation yet" in page and "metrics" not in re.findall(
        r'<table class="(\w+)"', page)
    kinds = re.findall(r'class="chart ([\w-]+)"', page)
    assert kinds and set(kinds) == {"line-chart"}
    assert "not run" in page  # dpo and simpo are in the recipe but have no directory


def test_partial_and_odd_inputs(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "eval" / "simpo.jsonl").unlink()                     # records missing
    (run / "eval" / "meta.json").unlink()                       # meta missing
    summary = json.loads((run / "eval" / "summary.json").read_text())
    summary["dpo"]["kl_vs_sft"] = None                          # no KL for one model
    summary["sft"]["mean_score_ci"] = None
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    _jsonl(run / "sft" / "metrics.jsonl", [{"step": 1, "loss": float("nan")},
                                           {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}])
    (run / "recipe.yaml").write_text(":: not yaml")
    page = R.write_report(run).read_text()
    for s in _svgs(page):
        ET.fromstring(s)
    assert page.count('class="pt"') == 2                    # sft and simpo have KL and score
    assert len(re.findall(r'class="chart hist-chart"', page)) == 2
    assert "eval/" in page


def test_missing_run_dir(tmp_path):
    from starpo.errors import StarpoError
    with pytest.raises(StarpoError):
        R.write_report(tmp_path / "nope")


def test_nice_ticks_and_bins():
    assert C.nice_ticks(0, 1) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    t = C.nice_ticks(-0.37, 0.82)
    assert t[0] <= -0.37 and t[-1] >= 0.82 and len(t) <= 8
    steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
    assert len(steps) == 1
    t = C.nice_ticks(5, 5)
    assert t[0] < 5 < t[-1]
    assert C.nice_ticks(float("nan"), 1) == [0.0, 1.0]
    edges = C.length_bins([0, 3, 17, 250])
    assert edges[0] <= 0 and edges[-1] > 250 and len(edges) - 1 <= 30
    widths = {b - a for a, b in zip(edges, edges[1:])}
    assert len(widths) == 1 and widths.pop() == int(edges[1] - edges[0])
    assert C.fmt(None) == "—" and C.fmt(float("nan")) == "—" and C.fmt(0.12345) == "0.123"
    assert RP.pick_sample_prompts({"a": [{"score": 0}, {"score": 1}, {"score": 0}],
                                  "b": [{"score": 0}, {"score": 0}, {"score": 0}]}, k=2) == [0, 1]


# =========================================================================== browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def _browser(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--virtual-time-budget=3000",
           f"--user-data-dir={tmp / 'profile'}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    PIL = pytest.importorskip("PIL.Image")
    run = make_run(tmp_path / "run")
    url = R.write_report(run).resolve().as_uri()

    dom = _browser(exe, tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<table class="metrics">' in html and "<tbody>" in html
    assert len(re.findall(r"<svg\b", html)) == 1 + len(MODELS) + 16
    assert html.count("<path") > 20 and html.count("<circle") > 20 and "<rect" in html

    png = tmp_path / "shot.png"
    shot = _browser(exe, tmp_path, f"--screenshot={png}", "--window-size=1400,3000",
                    "--hide-scrollbars", url)
    assert png.is_file() and png.stat().st_size > 20_000, shot.stderr[-2000:]
    img = PIL.open(png).convert("RGB")
    assert img.size == (1400, 3000)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 500  # text, plots, tables: not a blank page
    present = {c for _, c in colors}

    def near(hex_color: str) -> bool:
        r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
        return any(abs(r - x) + abs(g - y) + abs(b - z) <= 6 for x, y, z in present)

    # the models' colours reach the screen (scatter points, histogram bars, swatches)
    assert all(near(c) for c in C.PALETTE[:len(MODELS)])
    # the top of the page is not all background: the metrics table sits there
    top = img.crop((0, 0, 1400, 900)).getcolors(maxcolors=1 << 20)
    assert top is not None and len(top) > 100


# =========================================================================== what a newcomer reads


def _online_stage(run: Path) -> None:
    """An online stage as the pipeline leaves it: per-round logs, the combined log (with
    ``round`` and ``round_step``), round summaries in stage.json and no top-level steps."""
    import yaml
    tree = yaml.safe_load((run / "recipe.yaml").read_text())
    tree["stages"].insert(3, {"type": "online", "data": {"sources": [{"path": "world:prompt"}]}})
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    combined = []
    for k in (1, 2):
        recs = [{"step": s, "loss": 0.69 - 0.01 * s, "reward_accuracy": 0.5 + 0.02 * s,
                 "lr": 1e-5, "elapsed_s": s * 0.2} for s in range(4, 17, 4)]
        _jsonl(run / "online" / f"round_{k}" / "metrics.jsonl", recs)
        combined += [{**r, "step": r["step"] + 16 * (k - 1), "round": k, "round_step": r["step"]}
                     for r in recs]
    _jsonl(run / "online" / "metrics.jsonl", combined)
    (run / "online" / "stage.json").write_text(json.dumps(
        {"complete": True, "seconds": 30.0,
         "rounds": [{"round": 1, "steps": 16}, {"round": 2, "steps": 16}]}))


def _section(page: str, pattern: str) -> str:
    return re.search(pattern, page, flags=re.S).group(0)


def test_online_stage_steps_curves_once_and_round_marks(tmp_path):
    run = make_run(tmp_path / "run")
    _online_stage(run)
    page = R.write_report(run).read_text()
    stages = _section(page, r'<table class="stages">.*?</table>')
    row = re.search(r"<tr><th>online</th>.*?</tr>", stages).group(0)
    assert "<td>32 (2 rounds)</td>" in row                     # the sum of its rounds
    assert "loss 0.530" in row                                 # its last logged line
    curves = _section(page, r'<section id="curves">.*?</section>')
    assert "online/round_1" not in curves and "online/round_2" not in curves
    block = re.search(r"<h3>online .*?</div></h3>|<h3>online .*?(?=<h3>|</section>)",
                      curves, flags=re.S).group(0)
    titles = re.findall(r'class="title"[^>]*>([^<]+)</text>', block)
    assert titles == ["loss", "reward_accuracy", "lr"]         # no round, no round_step
    assert block.count('class="mark"') == len(titles)          # round 2's start, per chart
    assert "round 2" in block
    # while the stage runs (no combined file yet) its rounds' logs are drawn
    (run / "online" / "metrics.jsonl").unlink()
    page = R.write_report(run).read_text()
    assert "online/round_1" in page and "online/round_2" in page


def test_round_marks_sit_at_the_end_of_the_round_before():
    recs = [{"step": s, "round": 1 + (s > 16)} for s in (4, 8, 12, 16, 20, 24, 28, 32)]
    assert RP.round_marks(recs) == [(16.0, "round 2")]
    assert RP.round_marks([{"step": 1, "loss": 1}]) == []


def test_preference_stages_show_held_out_accuracy_before_and_after(tmp_path):
    run = make_run(tmp_path / "run")
    info = json.loads((run / "dpo" / "stage.json").read_text())
    info.update(eval_pairs=249, eval_before={"reward_accuracy": 0.5},
                eval_after={"reward_accuracy": 0.6305})
    (run / "dpo" / "stage.json").write_text(json.dumps(info))
    stages = _section(R.write_report(run).read_text(), r'<table class="stages">.*?</table>')
    assert "held-out reward accuracy" in stages
    row = re.search(r"<tr><th>dpo</th>.*?</tr>", stages).group(0)
    assert "0.500 → 0.630 (249 pairs)" in row or "0.500 → 0.631 (249 pairs)" in row
    sft = re.search(r"<tr><th>sft</th>.*?</tr>", stages).group(0)
    assert sft.endswith("<td>—</td></tr>")                    # an SFT stage has none


def test_length_histograms_cut_long_outliers_and_say_so(tmp_path):
    run = make_run(tmp_path / "run")
    recs = [json.loads(l) for l in (run / "eval" / "dpo.jsonl").open()]
    recs[0]["length"] = 256                                     # a runaway response
    _jsonl(run / "eval" / "dpo.jsonl", recs)
    page = R.write_report(run).read_text()
    note = re.search(r"The axis stops at (\d+) tokens.*?</p>", page, flags=re.S)
    assert note is not None and "1 of 120 responses are longer, up to 256 tokens" in note.group(0)
    assert int(note.group(1)) < 100
    hist = [s for s in _svgs(page) if "hist-chart" in s]
    assert all("256" not in re.sub(r"<title>.*?</title>", "", h) for h in hist)  # no 256 tick
    assert any("≥ " in h for h in hist)                       # the last bar's hover says so
    # the ordinary spread of lengths is not cut
    plain = R.write_report(make_run(tmp_path / "plain")).read_text()
    assert "The axis stops" not in plain


def test_length_axis_cut_and_bins():
    bulk = [10 + (i % 30) for i in range(500)]
    assert C.length_axis_cut(bulk) is None
    cut = C.length_axis_cut(bulk + [256] * 3)
    assert cut is not None and 35 <= cut <= 40
    edges = C.length_bins(bulk + [256] * 3, upper=cut)
    assert edges[-1] <= 45 and C.bin_counts(bulk + [256] * 3, edges)[-1] >= 3
    assert sum(C.bin_counts(bulk + [256] * 3, edges)) == 503   # none lost
    assert C.percentile([1, 2, 3, 4], 50) == 2.5 and C.percentile([5], 99) == 5


def test_best_is_not_bold_on_a_tie(tmp_path):
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    summary["sft"]["mean_score"] = -0.5
    summary["dpo"]["mean_score"], summary["simpo"]["mean_score"] = 0.1173, 0.1168  # 0.117 both
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    table = _section(R.write_report(run).read_text(), r'<table class="metrics">.*?</table>')
    first = [re.findall(r"<td( class=\"best\")?><span class=\"v\">", row)[0]
             for row in re.findall(r"<tr><th class=\"model\">.*?</tr>", table)]
    assert first == ["", "", ""]                               # mean score: nobody bold
    assert RP.best_of_column(summary, "mean_score", "sft") is None
    summary["dpo"]["mean_score"] = 0.125
    assert RP.best_of_column(summary, "mean_score", "sft") == "dpo"


def test_no_negative_zero_anywhere(tmp_path):
    assert C.signed(-0.0004) == "0.000" and C.signed(0.0004) == "0.000"
    assert C.signed(-0.042) == "−0.042" and C.signed(0.111) == "+0.111"
    run = make_run(tmp_path / "run")
    gaps = json.loads((run / "eval" / "gaps.json").read_text())
    gaps[1].update(gap=-0.00045, gap_ci=[-0.0392, 0.0415])
    (run / "eval" / "gaps.json").write_text(json.dumps(gaps))
    page = R.write_report(run).read_text()
    assert "-0.000" not in page and "−0.000" not in page
    assert '<span class="v">0.000</span><span class="ci">[−0.039, +0.042]' in page


def test_summary_on_top_gives_the_verdict_and_the_pick(tmp_path):
    run = make_run(tmp_path / "run")
    page = R.write_report(run).read_text()
    assert page.index('<section id="summary">') < page.index('<section id="stages">')
    summary = _section(page, r'<section id="summary">.*?</section>')
    text = re.sub(r"<[^>]+>", "", summary)
    assert "All 4 stages are complete." in text
    assert "by the gold judge on 40 held-out prompts" in text
    assert "dpo scores higher than sft: dpo − sft +0.100 [+0.040, +0.160]" in text
    assert "simpo is not distinguishable from dpo" in text
    assert "simpo scores lower than sft" in text
    assert "Pick " in text
    # no evaluation yet: the summary says so instead of a verdict
    shutil.rmtree(run / "eval")
    text = re.sub(r"<[^>]+>", "", _section(R.write_report(run).read_text(),
                                           r'<section id="summary">.*?</section>'))
    assert "3 of 4 stages are complete (eval not run)." in text
    assert "No evaluation yet" in text and "Pick" not in text


def _m(score, kl):
    return {"mean_score": score, "kl_vs_sft": kl}


def _g(model, base, gap, lo, hi):
    return {"model": model, "baseline": base, "n": 665, "gap": gap, "gap_ci": [lo, hi]}


def test_pick_the_best_when_the_paired_gap_clears_it():
    from starpo.report.verdict import pick_model
    summary = {"sft": _m(-0.27, 0.0), "dpo": _m(-0.21, 0.05), "online": _m(-0.15, 0.1)}
    gaps = [_g("dpo", "sft", 0.06, 0.02, 0.1), _g("online", "dpo", 0.058, 0.02, 0.099)]
    pick = pick_model(summary, gaps, "sft")
    assert pick.model == "online"
    assert "clear of dpo, the next best (online − dpo +0.058 [+0.020, +0.099])" in pick.why


def test_pick_the_closer_to_sft_of_models_the_gaps_cannot_separate():
    from starpo.report.verdict import pick_model
    # the run: online 0.1168, dpo 0.1173, gap −0.000 [−0.039, +0.042]
    summary = {"sft": _m(0.007, 0.0), "dpo": _m(0.1173, 0.133), "online": _m(0.1168, 0.203)}
    gaps = [_g("dpo", "sft", 0.111, 0.062, 0.161), _g("online", "dpo", -0.0005, -0.039, 0.042)]
    pick = pick_model(summary, gaps, "sft")
    assert pick.model == "dpo" and "stays closest to the SFT model" in pick.why
    # the higher scorer drifted further: the closer one is picked, and the text says why
    summary["online"]["mean_score"] = 0.12
    pick = pick_model(summary, gaps, "sft")
    assert pick.model == "dpo"
    assert pick.why.startswith("online scores highest (0.120) but the paired gaps do not "
                               "separate it from dpo (0.117)")
    # a preference stage no better than SFT: SFT is the pick
    summary = {"sft": _m(0.0, 0.0), "dpo": _m(0.01, 0.1)}
    pick = pick_model(summary, [_g("dpo", "sft", 0.01, -0.03, 0.05)], "sft")
    assert pick.model == "sft"


def test_pick_without_gaps_or_kl_says_what_it_could_not_test():
    from starpo.report.verdict import pick_model
    summary = {"sft": _m(0.0, None), "dpo": _m(0.2, None)}
    assert "no paired gap to sft" in pick_model(summary, [], "sft").why
    pick = pick_model(summary, [_g("dpo", "sft", 0.2, -0.1, 0.5)], "sft")
    assert pick.model == "dpo" and "without KL to the SFT model" in pick.why
    assert pick_model({"only": _m(0.1, 0.0)}, [], None).why.startswith("it is the only model")
    assert pick_model({}, [], None) is None
