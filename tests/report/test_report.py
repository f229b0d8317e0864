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
