"""``DIR/report.html``: one self-contained page about a run (no network, no JavaScript).

Contents, each part present when its data exists:

* the stages of the run (type, status, steps, time);
* for every evaluation (a stage directory holding ``summary.json``, ``eval/`` by default):
  the metrics table with bootstrap 95% intervals, a score-vs-KL scatter (one point per
  model, with its intervals as error bars), the response-length histograms of every
  model on shared axes, and a few prompts with every model's response side by side;
* training curves of every stage (each numeric column of ``DIR/<stage>/metrics.jsonl``
  against ``step``; an online stage's per-round ``metrics.jsonl`` files each get theirs).

A sweep directory (``sweep.json``, from ``starpo sweep``) gets a different page instead:
the robustness analysis of :mod:`starpo.metrics.analysis` (best run per method, expected
performance over the grid, runs worse than SFT, head-to-head win rates, length and KL of
the top-k% runs, sensitivity to each hyperparameter) and every trial linked to its own
report (see :func:`write_sweep_report`).

Plots are inline SVG written here (no plotting library): a chart is a few lines of path
data on a ``viewBox``, so the page scales with the window and prints cleanly.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence


from starpo import fileio
from starpo.metrics.names import EVAL_METRICS, HEADLINE_METRICS
from starpo.errors import StarpoError
from starpo.metrics.analysis import analyze_dir
from starpo.metrics.analysis import latest_records
from starpo.metrics.analysis import metric_of

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
           "#ff9da7", "#9c755f", "#7f7f7f"]

_HEADERS = {"mean_score": "mean score", "win_vs_chosen": "win vs chosen",
            "win_vs_sft": "win vs SFT", "kl_vs_sft": "KL vs SFT", "kl_vs_sft_per_token": "KL / token",
            "mean_length": "mean length", "finished_rate": "finished"}
_TIES = {"win_vs_chosen": "tie_vs_chosen", "win_vs_sft": "tie_vs_sft"}
# key, header, tie key, higher is better (None: no "best" marking); finished_rate is the
# share of responses ending with end-of-turn (not cut)
METRIC_COLUMNS = [(k, _HEADERS[k], _TIES.get(k), True if k in HEADLINE_METRICS else None)
                  for k in EVAL_METRICS + ("finished_rate",)]
PERCENT_COLUMNS = {"finished_rate"}

# curve keys drawn together in one chart, and the order charts appear in
CURVE_GROUPS = [
    ("loss",), ("reward_accuracy",), ("reward_margin",), ("reward_chosen", "reward_rejected"),
    ("logp_chosen", "logp_rejected"), ("token_prob_margin",), ("len_chosen", "len_rejected"),
    ("grad_norm",), ("lr",), ("tokens_per_s",), ("trained_tokens",),
]
CURVE_SKIP = {"step", "epoch", "elapsed_s"}

SAMPLE_PROMPTS = 4

esc = html.escape


# =========================================================================== reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _recipe_info(run_dir: Path) -> tuple[str, list[tuple[str, str]]]:
    """(run name, [(stage name, type)]) from the run's resolved recipe, if readable."""
    import yaml
    try:
        tree = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        tree = None
    name = run_dir.name
    stages: list[tuple[str, str]] = []
    if isinstance(tree, dict):
        name = str(tree.get("name") or name)
        for st in tree.get("stages") or []:
            if isinstance(st, dict) and st.get("type"):
                stages.append((str(st.get("name") or st["type"]), str(st["type"])))
    return name, stages


def _stage_dirs(run_dir: Path, recipe_stages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Stages to show: the recipe's, then any other directory with stage files."""
    seen = {n for n, _ in recipe_stages}
    extra = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir()) if run_dir.is_dir() else []:
        if d.name in seen or d.name in ("base", "refcache"):
            continue
        if (d / "metrics.jsonl").is_file() or (d / "summary.json").is_file() or \
                (d / "stage.json").is_file():
            extra.append((d.name, "eval" if (d / "summary.json").is_file() else "?"))
    return list(recipe_stages) + extra


def _metrics_files(stage_dir: Path) -> list[Path]:
    """``metrics.jsonl`` of a stage and of its sub-runs (online rounds), checkpoints aside."""
    if not stage_dir.is_dir():
        return []
    files = []
    if (stage_dir / "metrics.jsonl").is_file():
        files.append(stage_dir / "metrics.jsonl")
    for p in sorted(stage_dir.rglob("metrics.jsonl")):
        rel = p.relative_to(stage_dir).parts
        if p in files or any(part.startswith("checkpoint") or part.startswith(".")
                             for part in rel):
            continue
        files.append(p)
    return files


# =========================================================================== formatting


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, digits: int | None = None) -> str:
    """A number for a table cell: about 3 significant digits (``digits`` fixes the
    decimals), ``—`` for missing."""
    if not _finite(v):
        return "—"
    if digits is not None:
        return f"{v:.{digits}f}"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _pct(v: Any) -> str:
    return f"{100 * v:.0f}%" if _finite(v) else "—"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about ``n`` of them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = abs(hi) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if step >= raw:
            break
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    k = int(round((end - start) / step))
    return [start + i * step for i in range(k + 1)]


def _tick_label(v: float, step: float) -> str:
    if abs(v) < step * 1e-6:
        return "0"
    if abs(v) >= 1e5 or (step < 1e-3):
        return f"{v:.1e}"
    if abs(v) >= 1e4:
        return f"{v / 1000:g}k"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1  # steps like 2.5
    return f"{v:.{decimals}f}"


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


class _Frame:
    """Maps data coordinates into a plot area and draws axes, grid and tick labels."""

    def __init__(self, width: int, height: int, xs: Sequence[float], ys: Sequence[float], *,
                 left: int = 54, right: int = 14, top: int = 30, bottom: int = 40,
                 xticks: list[float] | None = None, yticks: list[float] | None = None):
        self.w, self.h = width, height
        self.l, self.r, self.t, self.b = left, right, top, bottom
        fx = [x for x in xs if math.isfinite(x)] or [0.0, 1.0]
        fy = [y for y in ys if math.isfinite(y)] or [0.0, 1.0]
        self.xt = xticks or nice_ticks(min(fx), max(fx))
        self.yt = yticks or nice_ticks(min(fy), max(fy))
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.l + (x - self.x0) / span * (self.w - self.l - self.r)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.h - self.b - (y - self.y0) / span * (self.h - self.t - self.b)

    def axes(self, title: str, xlabel: str = "", ylabel: str = "",
             title_y: float | None = None) -> list[str]:
        out = [f'<rect class="plotbg" x="{self.l}" y="{self.t}" '
               f'width="{self.w - self.l - self.r}" height="{self.h - self.t - self.b}"/>']
        ystep = self.yt[1] - self.yt[0] if len(self.yt) > 1 else 1.0
        xstep = self.xt[1] - self.xt[0] if len(self.xt) > 1 else 1.0
        for y in self.yt:
            p = self.py(y)
            out.append(f'<line class="grid" x1="{self.l}" x2="{self.w - self.r}" '
                       f'y1="{_num(p)}" y2="{_num(p)}"/>')
            out.append(f'<text class="tick" x="{self.l - 6}" y="{_num(p + 3.5)}" '
                       f'text-anchor="end">{esc(_tick_label(y, ystep))}</text>')
        for x in self.xt:
            p = self.px(x)
            out.append(f'<line class="grid" y1="{self.t}" y2="{self.h - self.b}" '
                       f'x1="{_num(p)}" x2="{_num(p)}"/>')
            out.append(f'<text class="tick" x="{_num(p)}" y="{self.h - self.b + 14}" '
                       f'text-anchor="middle">{esc(_tick_label(x, xstep))}</text>')
        out.append(f'<line class="axis" x1="{self.l}" x2="{self.w - self.r}" '
                   f'y1="{self.h - self.b}" y2="{self.h - self.b}"/>')
        out.append(f'<line class="axis" x1="{self.l}" x2="{self.l}" y1="{self.t}" '
                   f'y2="{self.h - self.b}"/>')
        ty = self.t - 10 if title_y is None else title_y
        out.append(f'<text class="title" x="{self.l}" y="{ty}">{esc(title)}</text>')
        if xlabel:
            out.append(f'<text class="label" x="{(self.l + self.w - self.r) / 2:.1f}" '
                       f'y="{self.h - 6}" text-anchor="middle">{esc(xlabel)}</text>')
        if ylabel:
            cy = (self.t + self.h - self.b) / 2
            out.append(f'<text class="label" transform="translate(12 {cy:.1f}) rotate(-90)" '
                       f'text-anchor="middle">{esc(ylabel)}</text>')
        return out


def _svg(width: int, height: int, body: Iterable[str], cls: str, label: str) -> str:
    return (f'<svg class="{cls}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{esc(label)}" '
            f'xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>")


# =========================================================================== charts


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str = "step", width: int = 380, height: int = 230,
               colors: Sequence[str] = PALETTE) -> str:
    """Lines of (label, xs, ys); non-finite values break a line. A legend when > 1 series."""
    xs = [x for _, sx, _ in series for x in sx if _finite(x)]
    ys = [y for _, _, sy in series for y in sy if _finite(y)]
    legend = len(series) > 1
    fr = _Frame(width, height, xs, ys, top=48 if legend else 30)
    body = fr.axes(title, xlabel, title_y=16 if legend else None)
    for k, (label, sx, sy) in enumerate(series):
        color = colors[k % len(colors)]
        pts = [(x, y) for x, y in zip(sx, sy)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in pts:
            if _finite(x) and _finite(y):
                runs[-1].append((x, y))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) >= 2:
                d = " ".join(f"{'M' if i == 0 else 'L'}{_num(fr.px(x))},{_num(fr.py(y))}"
                             for i, (x, y) in enumerate(run))
                body.append(f'<path class="line" d="{d}" stroke="{color}"/>')
            n_pts = sum(len(r) for r in runs)
            if len(run) == 1 or n_pts <= 40:
                for x, y in run:
                    body.append(f'<circle cx="{_num(fr.px(x))}" cy="{_num(fr.py(y))}" r="2.2" '
                                f'fill="{color}"><title>{esc(label)} step {x:g}: '
                                f'{fmt(y)}</title></circle>')
        if legend:  # under the title, above the plot
            lx = fr.l + k * 130
            body.append(f'<rect x="{lx}" y="{fr.t - 19}" width="10" height="10" '
                        f'fill="{color}"/><text class="legend" x="{lx + 14}" '
                        f'y="{fr.t - 10}">{esc(label)}</text>')
    return _svg(width, height, body, "chart line-chart", title)


def scatter_chart(points: Sequence[dict], *, title: str, xlabel: str, ylabel: str,
                  width: int = 620, height: int = 400) -> str:
    """Points ``{label, x, y, color, xci: [lo, hi]|None, yci: [lo, hi]|None}``."""
    xs, ys = [], []
    for p in points:
        xs += [p["x"]] + [v for v in (p.get("xci") or []) if _finite(v)]
        ys += [p["y"]] + [v for v in (p.get("yci") or []) if _finite(v)]
    # leave room for labels right of the points
    if xs:
        span = (max(xs) - min(xs)) or 1.0
        xs.append(max(xs) + 0.15 * span)
    fr = _Frame(width, height, xs, ys, left=62, bottom=46)
    body = fr.axes(title, xlabel, ylabel)
    for p in points:
        c = p.get("color", PALETTE[0])
        cx, cy = fr.px(p["x"]), fr.py(p["y"])
        xci, yci = p.get("xci"), p.get("yci")
        if xci and all(_finite(v) for v in xci):
            a, b = fr.px(xci[0]), fr.px(xci[1])
            body.append(f'<path class="err" d="M{_num(a)},{_num(cy)} L{_num(b)},{_num(cy)} '
                        f'M{_num(a)},{_num(cy - 4)} L{_num(a)},{_num(cy + 4)} '
                        f'M{_num(b)},{_num(cy - 4)} L{_num(b)},{_num(cy + 4)}" '
                        f'stroke="{c}"/>')
        if yci and all(_finite(v) for v in yci):
            a, b = fr.py(yci[0]), fr.py(yci[1])
            body.append(f'<path class="err" d="M{_num(cx)},{_num(a)} L{_num(cx)},{_num(b)} '
                        f'M{_num(cx - 4)},{_num(a)} L{_num(cx + 4)},{_num(a)} '
                        f'M{_num(cx - 4)},{_num(b)} L{_num(cx + 4)},{_num(b)}" '
                        f'stroke="{c}"/>')
        body.append(f'<circle class="pt" cx="{_num(cx)}" cy="{_num(cy)}" r="6" fill="{c}">'
                    f'<title>{esc(p["label"])}: KL {fmt(p["x"])}, score {fmt(p["y"])}</title>'
                    f'</circle>')
        body.append(f'<text class="ptlabel" x="{_num(cx + 9)}" y="{_num(cy - 7)}">'
                    f'{esc(p["label"])}</text>')
    return _svg(width, height, body, "chart scatter-chart", title)


def histogram_chart(values: Sequence[float], edges: Sequence[float], *, title: str,
                    color: str, ymax: float, xlabel: str = "tokens", width: int = 300,
                    height: int = 200, mean: float | None = None) -> str:
    """Counts of ``values`` in bins ``[edges[i], edges[i+1])`` (last bin closed)."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        if not _finite(v):
            continue
        i = 0
        while i < len(counts) - 1 and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    fr = _Frame(width, height, [edges[0], edges[-1]], [0.0, max(ymax, 1.0)],
                xticks=nice_ticks(edges[0], edges[-1], 5), left=44)
    fr.x0, fr.x1 = edges[0], edges[-1]
    fr.xt = [t for t in fr.xt if edges[0] <= t <= edges[-1]] or [edges[0], edges[-1]]
    body = fr.axes(title, xlabel)
    for i, c in enumerate(counts):
        if not c:
            continue
        x0, x1 = fr.px(edges[i]), fr.px(edges[i + 1])
        y = fr.py(c)
        body.append(f'<rect class="bar" x="{_num(x0 + 0.5)}" y="{_num(y)}" '
                    f'width="{_num(max(x1 - x0 - 1, 0.8))}" height="{_num(fr.py(0) - y)}" '
                    f'fill="{color}"><title>{edges[i]:g}–{edges[i + 1]:g} tokens: '
                    f'{c}</title></rect>')
    if mean is not None and _finite(mean):
        mx = fr.px(mean)
        body.append(f'<line class="meanline" x1="{_num(mx)}" x2="{_num(mx)}" y1="{fr.t}" '
                    f'y2="{fr.h - fr.b}"/><text class="tick" x="{_num(mx + 3)}" '
                    f'y="{fr.t + 10}">mean {fmt(mean, 1)}</text>')
    return _svg(width, height, body, "chart hist-chart", title)


def length_bins(all_values: Sequence[float], target: int = 24) -> list[float]:
    """Shared integer-aligned bin edges for length histograms (about ``target`` bins)."""
    vals = [v for v in all_values if _finite(v)]
    if not vals:
        return [0.0, 1.0]
    lo, hi = math.floor(min(vals)), math.floor(max(vals)) + 1
    width = max(1, math.ceil((hi - lo) / target))
    for nice in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        if nice >= width:
            width = nice
            break
    start = (lo // width) * width
    edges = [float(start)]
    while edges[-1] < hi:
        edges.append(edges[-1] + width)
    return edges


# =========================================================================== sections


def _model_colors(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _ci(m: dict, key: str) -> list[float] | None:
    ci = m.get(f"{key}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_finite(v) for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def _metrics_table(summary: dict[str, dict], colors: dict[str, str], reference: str | None
                   ) -> str:
    best: dict[str, float] = {}
    for key, _, _, higher in METRIC_COLUMNS:
        vals = [m.get(key) for n, m in summary.items() if _finite(m.get(key))
                and not (key == "win_vs_sft" and n == reference)]
        if higher and len(vals) > 1:
            best[key] = max(vals)
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _, _ in METRIC_COLUMNS)
    rows = []
    for name, m in summary.items():
        cells = []
        for key, _, tie_key, _ in METRIC_COLUMNS:
            v = m.get(key)
            cls = ' class="best"' if key in best and _finite(v) and v == best[key] else ""
            ci = _ci(m, key)
            f = _pct if key in PERCENT_COLUMNS else fmt
            txt = f'<span class="v">{f(v)}</span>'
            if ci:
                txt += f'<span class="ci">[{f(ci[0])}, {f(ci[1])}]</span>'
            if tie_key and _finite(m.get(tie_key)):
                txt += f'<span class="tie">ties {m[tie_key] * 100:.0f}%</span>'
            cells.append(f"<td{cls}>{txt}</td>")
        ref = ' <span class="tag">reference</span>' if name == reference else ""
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(name, "#888")}"></span>{esc(name)}{ref}</th>'
                    f'<td class="n">{fmt(m.get("n"), 0)}</td>' + "".join(cells) + "</tr>")
    return (f'<table class="metrics"><thead><tr><th>model</th><th>prompts</th>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _scatter_section(summary: dict[str, dict], colors: dict[str, str]) -> str:
    pts = []
    for name, m in summary.items():
        if _finite(m.get("kl_vs_sft")) and _finite(m.get("mean_score")):
            pts.append({"label": name, "x": float(m["kl_vs_sft"]), "y": float(m["mean_score"]),
                        "xci": _ci(m, "kl_vs_sft"), "yci": _ci(m, "mean_score"),
                        "color": colors.get(name, PALETTE[0])})
    if not pts:
        return '<p class="note">No KL to an SFT reference in this evaluation, so no ' \
               'score-vs-KL plot.</p>'
    return scatter_chart(pts, title="Gold score vs KL to SFT (95% intervals)",
                         xlabel="KL(π ‖ π_sft), nats per response", ylabel="mean gold score")


def _length_section(records: dict[str, list[dict]], summary: dict[str, dict],
                    colors: dict[str, str]) -> str:
    lengths = {n: [r.get("length") for r in recs if _finite(r.get("length"))]
               for n, recs in records.items() if recs}
    lengths = {n: v for n, v in lengths.items() if v}
    if not lengths:
        return '<p class="note">No per-response records, so no length distributions.</p>'
    edges = length_bins([v for vs in lengths.values() for v in vs])
    ymax = 0
    for vs in lengths.values():
        counts: dict[int, int] = {}
        for v in vs:
            i = 0
            while i < len(edges) - 2 and v >= edges[i + 1]:
                i += 1
            counts[i] = counts.get(i, 0) + 1
        ymax = max(ymax, max(counts.values()))
    ymax = nice_ticks(0, ymax)[-1]
    charts = []
    for n, vs in lengths.items():
        mean = summary.get(n, {}).get("mean_length")
        if not _finite(mean):
            mean = sum(vs) / len(vs)
        charts.append(histogram_chart(vs, edges, title=f"{n} (n={len(vs)})",
                                      color=colors.get(n, PALETTE[0]), ymax=ymax, mean=mean))
    return '<div class="grid">' + "".join(f'<div class="cell">{c}</div>' for c in charts) + \
        "</div>"


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        parts = []
        for m in prompt:
            if isinstance(m, dict):
                role, content = m.get("role", "?"), m.get("content", "")
                parts.append(content if len(prompt) == 1 else f"{role}: {content}")
        return "\n".join(parts)
    return str(prompt)


def pick_sample_prompts(records: dict[str, list[dict]], k: int = SAMPLE_PROMPTS) -> list[int]:
    """Indices of prompts to show: the first one, then those where the models' scores
    differ most (ties broken by order), ``k`` in all, in prompt order."""
    lists = [recs for recs in records.values() if recs]
    if not lists:
        return []
    n = min(len(r) for r in lists)
    if n == 0:
        return []
    spread = []
    for i in range(n):
        sc = [r[i].get("score") for r in lists if _finite(r[i].get("score"))]
        spread.append((max(sc) - min(sc)) if len(sc) > 1 else 0.0)
    picks = [0]
    for i in sorted(range(1, n), key=lambda i: (-spread[i], i)):
        if len(picks) >= k:
            break
        picks.append(i)
    return sorted(picks)


def _samples_section(records: dict[str, list[dict]], colors: dict[str, str]) -> str:
    picks = pick_sample_prompts(records)
    if not picks:
        return '<p class="note">No per-response records to show.</p>'
    names = [n for n, r in records.items() if r]
    out = []
    for i in picks:
        first = records[names[0]][i]
        cards = []
        chosen = first.get("chosen")
        if chosen:
            cards.append(f'<div class="card ref"><div class="who">dataset chosen '
                         f'<span class="score">score {fmt(first.get("chosen_score"))}</span>'
                         f'</div><div class="resp">{esc(str(chosen))}</div></div>')
        for n in names:
            r = records[n][i]
            cut = "" if r.get("finished", True) else ' <span class="tag">cut at max tokens</span>'
            cards.append(
                f'<div class="card" style="border-top-color:{colors.get(n, "#888")}">'
                f'<div class="who">{esc(n)} <span class="score">score {fmt(r.get("score"))}'
                f' · {fmt(r.get("length"), 0)} tok</span>{cut}</div>'
                f'<div class="resp">{esc(str(r.get("response", "")))}</div></div>')
        out.append(f'<div class="sample"><div class="prompt"><span class="pid">'
                   f'{esc(str(first.get("id", i)))}</span>{esc(_prompt_text(first.get("prompt")))}'
                   f'</div><div class="cards" style="grid-template-columns:repeat('
                   f'{len(cards)}, minmax(0, 1fr))">{"".join(cards)}</div></div>')
    return "".join(out)


def _curve_charts(recs: list[dict]) -> list[str]:
    recs = [r for r in recs if _finite(r.get("step"))]
    if not recs:
        return []
    recs.sort(key=lambda r: r["step"])
    keys = []
    for r in recs:
        for k, v in r.items():
            if k not in CURVE_SKIP and k not in keys and _finite(v):
                keys.append(k)
    groups: list[tuple[str, ...]] = []
    used: set[str] = set()
    for g in CURVE_GROUPS:
        present = tuple(k for k in g if k in keys)
        if present:
            groups.append(present)
            used.update(present)
    groups += [(k,) for k in sorted(keys) if k not in used]
    steps = [float(r["step"]) for r in recs]
    charts = []
    for g in groups:
        series = [(k, steps, [float(r[k]) if _finite(r.get(k)) else float("nan") for r in recs])
                  for k in g]
        title = " / ".join(g)
        charts.append(line_chart(series, title=title))
    return charts


def _curves_section(run_dir: Path, stages: list[tuple[str, str]]) -> str:
    blocks = []
    for name, kind in stages:
        for f in _metrics_files(run_dir / name):
            recs = fileio.read_jsonl(f)
            charts = _curve_charts(recs)
            if not charts:
                continue
            rel = f.parent.relative_to(run_dir).as_posix()
            label = rel if rel != name else name
            blocks.append(f'<h3>{esc(label)} <span class="kind">{esc(kind)}</span> '
                          f'<span class="note">{len(recs)} logged steps</span></h3>'
                          '<div class="grid">' +
                          "".join(f'<div class="cell">{c}</div>' for c in charts) + "</div>")
    if not blocks:
        return '<p class="note">No training metrics (metrics.jsonl) in this run yet.</p>'
    return "".join(blocks)


def _stages_table(run_dir: Path, stages: list[tuple[str, str]]) -> str:
    rows = []
    for name, kind in stages:
        d = run_dir / name
        info = _read_json(d / "stage.json") if (d / "stage.json").is_file() else None
        if isinstance(info, dict):
            status = "complete"
        elif d.is_dir() and (d / "checkpoints").is_dir():
            status = "partial"
        elif d.is_dir():
            status = "started"
        else:
            status = "not run"
        info = info if isinstance(info, dict) else {}
        steps = info.get("steps")
        secs = info.get("seconds")
        final = info.get("final") if isinstance(info.get("final"), dict) else {}
        shown = [(k, final[k]) for k in ("loss", "reward_accuracy") if _finite(final.get(k))]
        last = ", ".join(f"{k} {fmt(v)}" for k, v in shown)
        rows.append(f'<tr><th>{esc(name)}</th><td>{esc(kind)}</td>'
                    f'<td class="status {status.replace(" ", "-")}">{status}</td>'
                    f'<td>{fmt(steps, 0) if _finite(steps) else "—"}</td>'
                    f'<td>{fmt(secs, 1) if _finite(secs) else "—"}</td>'
                    f'<td>{esc(last) or "—"}</td></tr>')
    return ('<table class="stages"><thead><tr><th>stage</th><th>type</th><th>status</th>'
            '<th>steps</th><th>seconds</th><th>last logged</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _eval_dirs(run_dir: Path, stages: list[tuple[str, str]]) -> list[Path]:
    out = []
    for name, _ in stages:
        if (run_dir / name / "summary.json").is_file():
            out.append(run_dir / name)
    if (run_dir / "eval" / "summary.json").is_file() and run_dir / "eval" not in out:
        out.insert(0, run_dir / "eval")
    return out


def _eval_section(run_dir: Path, d: Path) -> str:
    summary = _read_json(d / "summary.json")
    if not isinstance(summary, dict) or not summary:
        return f'<p class="note">{esc(str(d / "summary.json"))} is empty or unreadable.</p>'
    summary = {str(k): v for k, v in summary.items() if isinstance(v, dict)}
    meta = _read_json(d / "meta.json")
    meta = meta if isinstance(meta, dict) else {}
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    reference = meta.get("reference")
    records = {}
    for name in summary:
        f = d / str(files.get(name) or f"{fileio.safe_name(name)}.jsonl")
        records[name] = fileio.read_jsonl(f) if f.is_file() else []
    colors = _model_colors(list(summary))
    gen = meta.get("generation") if isinstance(meta.get("generation"), dict) else {}
    facts = []
    if meta.get("prompts"):
        facts.append(f"{meta['prompts']} prompts")
    if meta.get("judge"):
        facts.append(f"judge: {meta['judge']}" + (f" ({meta['judge_source']})"
                                                  if meta.get("judge_source") else ""))
    if gen:
        facts.append("sampling: " + ", ".join(f"{k} {gen[k]}" for k in
                                               ("temperature", "top_p", "max_new_tokens")
                                               if k in gen))
    if meta.get("seed") is not None:
        facts.append(f"seed {meta['seed']}")
    if reference:
        facts.append(f"SFT reference: {reference}")
    if meta.get("bootstrap"):
        facts.append(f"95% intervals from {meta['bootstrap']} bootstrap resamples of prompts")
    rel = d.relative_to(run_dir).as_posix()
    return (
        f'<section id="eval-{esc(rel)}"><h2>Evaluation <span class="kind">{esc(rel)}/'
        f'</span></h2><p class="facts">{esc(" · ".join(facts))}</p>'
        + _metrics_table(summary, colors, reference) +
        '<p class="legend-note">win rates count ties as ½; KL = Σ<sub>t</sub> [log π − log '
        'π<sub>sft</sub>] over the model\'s own sampled tokens (end of turn included); KL / '
        'token divides by those tokens; length = response tokens without the end-of-turn '
        'token; finished = share of responses that ended their turn (the rest hit '
        'max_new_tokens). Best value of a column in bold.</p>'
        '<div class="two"><div class="cell">'
        + _scatter_section(summary, colors) + '</div><div class="cell">'
        '<h3>Response length</h3>' + _length_section(records, summary, colors) +
        '</div></div><h3>Sample responses</h3>' + _samples_section(records, colors) +
        "</section>")


CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d0d7de; --bg:#ffffff; --soft:#f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; }
main { max-width: 1320px; margin: 0 auto; padding: 20px 28px 60px; }
h1 { font-size: 24px; margin: 6px 0 2px; }
h2 { font-size: 19px; margin: 30px 0 8px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.kind { color: var(--muted); font-weight: normal; font-size: 0.85em; }
.note, .facts, .legend-note, .sub { color: var(--muted); }
.legend-note { font-size: 12px; margin: 4px 0 10px; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: right; vertical-align: top; }
thead th { background: var(--soft); text-align: center; font-weight: 600; }
th.model, table.stages th { text-align: left; white-space: nowrap; }
table.metrics td .v { display: block; font-variant-numeric: tabular-nums; font-size: 15px; }
table.metrics td .ci, table.metrics td .tie { display: block; color: var(--muted);
                                              font-size: 11px; }
table.metrics td.best .v { font-weight: 700; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 7px; }
.tag { font-size: 10px; background: #ddf4ff; color: #0550ae; border-radius: 8px; padding: 1px 6px;
       font-weight: normal; }
td.status.complete { color: #1a7f37; } td.status.partial, td.status.started { color: #9a6700; }
td.status.not-run { color: var(--muted); }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.cell { background: var(--bg); }
.two { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; margin-top: 12px; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg .plotbg { fill: #fbfcfd; stroke: none; }
svg .grid { stroke: #e6e9ed; stroke-width: 1; }
svg .axis { stroke: #8c959f; stroke-width: 1; }
svg .tick { font-size: 10px; fill: #57606a; }
svg .label { font-size: 11px; fill: #424a53; }
svg .title { font-size: 12.5px; font-weight: 600; fill: #1f2328; }
svg .legend { font-size: 10.5px; fill: #424a53; }
svg .line { fill: none; stroke-width: 1.8; stroke-linejoin: round; }
svg .err { stroke-width: 1.5; fill: none; }
svg .pt { stroke: #fff; stroke-width: 1.5; }
svg .ptlabel { font-size: 12px; font-weight: 600; fill: #1f2328; }
svg .meanline { stroke: #1f2328; stroke-dasharray: 4 3; stroke-width: 1; }
.sample { border: 1px solid var(--line); border-radius: 6px; margin: 12px 0; overflow: hidden; }
.prompt { background: var(--soft); padding: 8px 12px; white-space: pre-wrap;
          border-bottom: 1px solid var(--line); }
.pid { color: var(--muted); font-size: 11px; margin-right: 10px; }
.cards { display: grid; gap: 0; }
.card { padding: 8px 12px; border-top: 3px solid #888; border-right: 1px solid var(--line);
        min-width: 0; }
.card:last-child { border-right: none; }
.card.ref { border-top-color: #d0d7de; background: #fcfcfd; }
.who { font-weight: 600; margin-bottom: 4px; }
.score { color: var(--muted); font-weight: normal; font-size: 12px; margin-left: 4px; }
.resp { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def render_report(run_dir: str | Path) -> str:
    """The report page of ``run_dir`` as an HTML string."""
    run_dir = Path(run_dir)
    name, recipe_stages = _recipe_info(run_dir)
    stages = _stage_dirs(run_dir, recipe_stages)
    evals = _eval_dirs(run_dir, stages)
    nav = ['<a href="#stages">stages</a>']
    nav += [f'<a href="#eval-{esc(d.relative_to(run_dir).as_posix())}">evaluation'
            f'{"" if len(evals) == 1 else " " + esc(d.name)}</a>' for d in evals]
    nav.append('<a href="#curves">training curves</a>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>starpo report: {esc(name)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>starpo report: {esc(name)}</h1>",
        f'<p class="sub">{esc(str(run_dir.resolve()))} · written '
        f'{esc(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>',
        "<nav>" + "".join(nav) + "</nav>",
        '<section id="stages"><h2>Stages</h2>',
        _stages_table(run_dir, stages) if stages else '<p class="note">No stages found.</p>',
        "</section>",
    ]
    if evals:
        parts += [_eval_section(run_dir, d) for d in evals]
    else:
        parts.append('<section id="eval"><h2>Evaluation</h2><p class="note">This run has no '
                     'evaluation yet: add an <code>eval</code> stage to the recipe or run '
                     f'<code>starpo eval {esc(str(run_dir))}</code>.</p></section>')
    parts += ['<section id="curves"><h2>Training curves</h2>',
              _curves_section(run_dir, stages), "</section>",
              "<footer>Generated by starpo. Self-contained: no scripts, no network.</footer>",
              "</main></body></html>"]
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StarpoError(f"{run_dir}: no such run directory")
    if is_sweep_dir(run_dir):   # a sweep directory gets the sweep page
        return write_sweep_report(run_dir)
    page = render_report(run_dir)
    return fileio.write_text(run_dir / "report.html", page)


# =========================================================================== sweeps
#
# ``starpo report DIR`` on a sweep directory (one with ``sweep.json``, written by
# ``starpo sweep``) renders the sweep page instead: the robustness analysis of
# :mod:`starpo.metrics.analysis` as tables and charts, and every trial linked to its own report.


def is_sweep_dir(path: str | Path) -> bool:
    """A sweep directory (``starpo sweep`` writes ``sweep.json`` first)."""
    return (Path(path) / "sweep.json").is_file()


def box_chart(groups: Sequence[dict], *, title: str, ylabel: str = "",
              baseline: float | None = None, baseline_label: str = "SFT",
              width: int = 380, height: int = 250) -> str:
    """One box per group ``{label, stats, points, color, ids}``: whiskers min–max, box
    q25–q75, a line at the median (``stats`` from :func:`starpo.metrics.analysis.describe`), and
    every value of ``points`` as a dot (hover: its id). A dashed line marks ``baseline``."""
    groups = [g for g in groups if g.get("stats") and g["stats"].get("n")]
    ys: list[float] = []
    for g in groups:
        s = g["stats"]
        ys += [s["min"], s["max"]] + [p for p in g.get("points") or [] if _finite(p)]
    if _finite(baseline):
        ys.append(float(baseline))
    n = max(len(groups), 1)
    fr = _Frame(width, height, [0.0, float(n)], ys or [0.0, 1.0], xticks=[0.0, float(n)],
                bottom=52)
    fr.xt = []  # categorical x: labels under each box instead of numeric ticks
    body = fr.axes(title, "", ylabel)
    half = 0.18
    for i, g in enumerate(groups):
        s, c = g["stats"], g.get("color", PALETTE[i % len(PALETTE)])
        cx = i + 0.5
        x0, x1, xm = fr.px(cx - half), fr.px(cx + half), fr.px(cx)
        body.append(f'<path class="whisker" d="M{_num(xm)},{_num(fr.py(s["min"]))} '
                    f'L{_num(xm)},{_num(fr.py(s["q25"]))} M{_num(xm)},{_num(fr.py(s["q75"]))} '
                    f'L{_num(xm)},{_num(fr.py(s["max"]))} '
                    f'M{_num(fr.px(cx - half / 2))},{_num(fr.py(s["min"]))} '
                    f'L{_num(fr.px(cx + half / 2))},{_num(fr.py(s["min"]))} '
                    f'M{_num(fr.px(cx - half / 2))},{_num(fr.py(s["max"]))} '
                    f'L{_num(fr.px(cx + half / 2))},{_num(fr.py(s["max"]))}" stroke="{c}"/>')
        top, bot = fr.py(s["q75"]), fr.py(s["q25"])
        body.append(f'<rect class="box" x="{_num(x0)}" y="{_num(top)}" '
                    f'width="{_num(x1 - x0)}" height="{_num(max(bot - top, 0.8))}" '
                    f'stroke="{c}" fill="{c}"><title>{esc(g["label"])}: median '
                    f'{fmt(s["median"])}, q25 {fmt(s["q25"])}, q75 {fmt(s["q75"])}, min '
                    f'{fmt(s["min"])}, max {fmt(s["max"])}, n {s["n"]}</title></rect>')
        body.append(f'<line class="median" x1="{_num(x0)}" x2="{_num(x1)}" '
                    f'y1="{_num(fr.py(s["median"]))}" y2="{_num(fr.py(s["median"]))}"/>')
        pts = g.get("points") or []
        ids = g.get("ids") or [""] * len(pts)
        for j, (p, pid) in enumerate(zip(pts, ids)):
            if not _finite(p):
                continue
            # spread the dots sideways so equal values stay visible (deterministic)
            off = ((j % 7) - 3) / 3 * half * 0.9
            body.append(f'<circle class="dot" cx="{_num(fr.px(cx + half * 1.6 + off / 3))}" '
                        f'cy="{_num(fr.py(p))}" r="2.6" fill="{c}"><title>{esc(str(pid))}: '
                        f'{fmt(p)}</title></circle>')
        body.append(f'<text class="label" x="{_num(xm)}" y="{fr.h - fr.b + 16}" '
                    f'text-anchor="middle">{esc(g["label"])}</text>')
    if _finite(baseline):
        body.append(_baseline_line(fr, float(baseline), baseline_label))
    return _svg(width, height, body, "chart box-chart", title)


def _baseline_line(fr: "_Frame", y_value: float, label: str) -> str:
    """A dashed horizontal line across the plot at ``y_value``, labelled at its right end."""
    y = fr.py(y_value)
    return (f'<line class="meanline" x1="{fr.l}" x2="{fr.w - fr.r}" y1="{_num(y)}" '
            f'y2="{_num(y)}"/><text class="tick" x="{fr.w - fr.r - 4}" y="{_num(y - 4)}" '
            f'text-anchor="end">{esc(label)} {fmt(y_value)}</text>')


def value_chart(rows: Sequence[dict], *, title: str, xlabel: str, ylabel: str,
                color: str = PALETTE[0], width: int = 300, height: int = 210) -> str:
    """Mean of a metric at each value of a hyperparameter, with a bar from the worst to
    the best run at that value. ``rows``: ``{value, mean, min, max, n, failed}``. Numeric
    values are placed on a linear axis (a log axis when they span more than 20×),
    others side by side."""
    vals = [r["value"] for r in rows]
    numeric = all(_finite(v) for v in vals)
    log = numeric and min(vals) > 0 and max(vals) / min(vals) > 20
    if numeric:
        xs = [math.log10(v) if log else float(v) for v in vals]
    else:
        xs = [float(i) for i in range(len(vals))]
    ys = [y for r in rows for y in (r.get("min"), r.get("max"), r.get("mean")) if _finite(y)]
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.12 or 0.5
    fr = _Frame(width, height, [lo - pad, hi + pad], ys or [0.0, 1.0],
                xticks=[lo - pad, hi + pad], bottom=44)
    fr.xt = []
    body = fr.axes(title, xlabel, ylabel)
    pts = []
    for x, r in zip(xs, rows):
        px = fr.px(x)
        if _finite(r.get("min")) and _finite(r.get("max")):
            body.append(f'<path class="err" d="M{_num(px)},{_num(fr.py(r["min"]))} '
                        f'L{_num(px)},{_num(fr.py(r["max"]))}" stroke="{color}"/>')
        if _finite(r.get("mean")):
            pts.append((px, fr.py(r["mean"])))
            fail = f", {r['failed']} failed" if r.get("failed") else ""
            body.append(f'<circle cx="{_num(px)}" cy="{_num(fr.py(r["mean"]))}" r="3.5" '
                        f'fill="{color}"><title>{esc(_value_text(r["value"]))}: mean '
                        f'{fmt(r["mean"])} over {r.get("n")} runs (min {fmt(r.get("min"))}, max '
                        f'{fmt(r.get("max"))}){fail}</title></circle>')
        elif r.get("failed"):
            body.append(f'<text class="tick" x="{_num(px)}" y="{fr.t + 12}" '
                        f'text-anchor="middle">failed</text>')
        body.append(f'<text class="tick" x="{_num(px)}" y="{fr.h - fr.b + 14}" '
                    f'text-anchor="middle">{esc(_value_text(r["value"]))}</text>')
    if len(pts) >= 2:
        d = " ".join(f"{'M' if i == 0 else 'L'}{_num(x)},{_num(y)}" for i, (x, y) in
                     enumerate(pts))
        body.append(f'<path class="line" d="{d}" stroke="{color}"/>')
    return _svg(width, height, body, "chart value-chart", title)


def trials_scatter(points: Sequence[dict], legend: Sequence[tuple[str, str]], *, title: str,
                   xlabel: str, ylabel: str, baseline: float | None = None,
                   width: int = 620, height: int = 380) -> str:
    """Unlabelled points ``{x, y, color, label}`` (hover: the label) with a legend."""
    xs = [p["x"] for p in points]
    ys = [p["y"] for p in points] + ([float(baseline)] if _finite(baseline) else [])
    fr = _Frame(width, height, xs, ys, left=62, bottom=46, top=48)
    body = fr.axes(title, xlabel, ylabel, title_y=16)
    for k, (name, color) in enumerate(legend):
        lx = fr.l + k * 120
        body.append(f'<rect x="{lx}" y="{fr.t - 19}" width="10" height="10" fill="{color}"/>'
                    f'<text class="legend" x="{lx + 14}" y="{fr.t - 10}">{esc(name)}</text>')
    if _finite(baseline):
        body.append(_baseline_line(fr, float(baseline), "SFT"))
    for p in points:
        body.append(f'<circle class="pt" cx="{_num(fr.px(p["x"]))}" cy="{_num(fr.py(p["y"]))}" '
                    f'r="5" fill="{p["color"]}"><title>{esc(p["label"])}</title></circle>')
    return _svg(width, height, body, "chart scatter-chart", title)


def _k_text(res: dict) -> str:
    """k of the top-k% runs as written in titles (25, 12.5)."""
    k = res.get("top_k_percent")
    return f"{k:g}" if _finite(k) else "?"


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _params_text(params: dict | None) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_value_text(v)}" for k, v in (params or {}).items())


def _trial_link(info: dict, tid: Any) -> str:
    """The trial id linked to the trial's own report (relative, works offline)."""
    if tid is None:
        return "—"
    d = next((t.get("dir") for t in info.get("trials", []) if t.get("id") == tid), None)
    d = d or f"trials/{tid}"
    return f'<a href="{esc(d)}/report.html">{esc(str(tid))}</a>'


def _heat(v: Any) -> str:
    """Background for a win rate: red below ½, green above, white at ½."""
    if not _finite(v):
        return ""
    t = max(-1.0, min(1.0, (float(v) - 0.5) * 2))
    if t >= 0:
        r, g, b = int(255 - 120 * t), 255, int(255 - 120 * t)
    else:
        r, g, b = 255, int(255 + 120 * t), int(255 + 120 * t)
    return f' style="background:rgb({r},{g},{b})"'


def _sweep_summary(info: dict, res: dict, records: list[dict]) -> str:
    base = res.get("baseline") or {}
    secs = sum(r.get("seconds") or 0 for r in records)
    ok = sum(r.get("status") == "ok" for r in records)
    facts = [f"recipe {info.get('recipe', '?')}",
             f"preference stage {info.get('preference_stage', '?')}",
             "shared stages: " + (", ".join(info.get("shared") or []) or "none"),
             f"{res.get('finished', len(records))} of {res.get('planned', len(records))} "
             f"trials finished ({ok} ok, {len(records) - ok} failed)",
             f"trial wall time {secs / 60:.1f} min in all"]
    if _finite(base.get("mean_score")):
        facts.append(f"SFT baseline: mean score {fmt(base['mean_score'])}, length "
                     f"{fmt(base.get('mean_length'))} ({res.get('baseline_source')})")
    else:
        facts.append("no SFT baseline (no evaluation of an SFT model)")
    facts.append(f"best = highest {res.get('metric')}; top {_k_text(res)}% "
                 f"runs; head to head also between the "
                 f"{fmt(100 * (res.get('percentile') or 0.75), 0)}th-percentile runs")
    return "<ul class=\"facts\">" + "".join(f"<li>{esc(f)}</li>" for f in facts) + "</ul>"


def _best_table(info: dict, res: dict, colors: dict[str, str]) -> str:
    ref = res.get("reference_method")
    head = "".join(f"<th>{esc(h)}</th>" for k, h, _, _ in METRIC_COLUMNS if k in EVAL_METRICS)
    rows = []
    for m in res.get("methods", []):
        b = (res.get("best") or {}).get(m)
        if not b:
            rows.append(f'<tr><th class="model">{esc(m)}</th><td colspan="{len(EVAL_METRICS) + 3}" '
                        f'class="note">no finished run</td></tr>')
            continue
        cells = "".join(f"<td>{fmt(b['metrics'].get(k))}</td>" for k, _, _, _ in METRIC_COLUMNS
                        if k in EVAL_METRICS)
        vs = b.get("vs_sft") or {}
        vr = b.get("vs_reference") or {}
        d_sft = fmt(vs.get("mean_score")) if _finite(vs.get("mean_score")) else "—"
        pct = "—"
        if m != ref and (_finite(vr.get("mean_score_pct")) or _finite(vr.get("mean_length_pct"))):
            pct = (f"score {vr.get('mean_score_pct', 0):+.1f}%, length "
                   f"{vr.get('mean_length_pct', 0):+.1f}%") if _finite(
                vr.get("mean_score_pct")) and _finite(vr.get("mean_length_pct")) else "—"
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(m, "#888")}"></span>{esc(m)}</th>'
                    f'<td class="id">{_trial_link(info, b["id"])}</td>'
                    f'<td class="params">{esc(_params_text(b.get("params")))}</td>{cells}'
                    f'<td>{d_sft}</td><td>{esc(pct)}</td></tr>')
    return (f'<table class="metrics"><thead><tr><th>method</th><th>best run</th>'
            f'<th>parameters</th>{head}<th>score − SFT</th><th>vs best {esc(str(ref))}</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


EXPECTED_CHARTS = [("mean_score", "mean gold score"), ("win_vs_sft", "win rate vs SFT"),
                   ("kl_vs_sft", "KL to SFT (nats)"), ("mean_length", "mean length (tokens)")]


def _expected_section(res: dict, records: list[dict], colors: dict[str, str]) -> str:
    base = res.get("baseline") or {}
    charts = []
    for key, label in EXPECTED_CHARTS:
        groups = []
        for m in res.get("methods", []):
            ok = [r for r in records if r.get("method") == m and r.get("status") == "ok"]
            groups.append({"label": m, "stats": res["expected"][m][key],
                           "points": [metric_of(r, key) for r in ok],
                           "ids": [r.get("id") for r in ok], "color": colors.get(m)})
        bl = base.get(key) if key in ("mean_score", "mean_length") else None
        charts.append(box_chart(groups, title=label, baseline=bl, width=300))
    head = "".join(f"<th>{esc(h)}</th>" for k, h, _, _ in METRIC_COLUMNS if k in EVAL_METRICS)
    rows = []
    for m in res.get("methods", []):
        cells = []
        for k, _, _, _ in METRIC_COLUMNS:
            if k not in EVAL_METRICS:
                continue
            s = res["expected"][m][k]
            if not s.get("n"):
                cells.append("<td>—</td>")
                continue
            cells.append(f'<td><span class="v">{fmt(s["median"])}</span><span class="ci">'
                         f'[{fmt(s["q25"])}, {fmt(s["q75"])}]</span><span class="ci">'
                         f'{fmt(s["min"])} … {fmt(s["max"])}</span></td>')
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(m, "#888")}"></span>{esc(m)}</th>'
                    f'<td class="n">{res["expected"][m]["mean_score"].get("n", 0)}</td>'
                    + "".join(cells) + "</tr>")
    table = (f'<table class="metrics"><thead><tr><th>method</th><th>runs</th>{head}</tr>'
             f'</thead><tbody>{"".join(rows)}</tbody></table>')
    return ('<div class="grid">' + "".join(f'<div class="cell">{c}</div>' for c in charts)
            + '</div>' + table + '<p class="legend-note">Each cell: the median over the '
            'method\'s grid, [q25, q75], then min … max. Dots are runs; dashed line: the SFT '
            'model.</p>')


def _robustness_table(res: dict, colors: dict[str, str]) -> str:
    rows = []
    for m in res.get("methods", []):
        r = res["robustness"][m]
        worse = "—" if r.get("worse") is None else f'{r["worse"]} of {r["ok"]}'
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(m, "#888")}"></span>{esc(m)}</th><td>{r["trials"]}</td>'
                    f'<td>{r["ok"]}</td><td>{r["failed"]}</td><td>{worse}</td>'
                    f'<td>{_pct(r.get("share_worse"))}</td>'
                    f'<td>{_pct(r.get("share_worse_or_failed"))}</td></tr>')
    return ('<table class="metrics"><thead><tr><th>method</th><th>trials</th><th>ok</th>'
            '<th>failed</th><th>worse than SFT</th><th>share worse</th>'
            '<th>share worse or failed</th></tr></thead><tbody>' + "".join(rows) +
            '</tbody></table>')


def _h2h_table(h2h: dict | None, info: dict, title: str) -> str:
    if not h2h or not h2h.get("matrix"):
        return f'<h3>{esc(title)}</h3><p class="note">Not enough runs with per-prompt ' \
               f'records.</p>'
    ms = list(h2h["matrix"])
    head = "".join(f"<th>vs {esc(b)}</th>" for b in ms)
    rows = []
    for a in ms:
        cells = []
        for b in ms:
            if a == b:
                cells.append('<td class="diag">—</td>')
                continue
            w = h2h["matrix"][a].get(b) or {}
            tie = f'<span class="tie">ties {100 * w["tie"]:.0f}%</span>' if _finite(
                w.get("tie")) else ""
            cells.append(f'<td{_heat(w.get("win"))}><span class="v">{_pct(w.get("win"))}'
                         f'</span>{tie}</td>')
        rows.append(f'<tr><th class="model">{esc(a)} <span class="kind">'
                    f'{_trial_link(info, h2h["runs"].get(a))}</span></th>{"".join(cells)}</tr>')
    return (f'<h3>{esc(title)}</h3><table class="metrics h2h"><thead><tr><th>run</th>{head}'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _topk_section(res: dict, colors: dict[str, str]) -> str:
    k = _k_text(res)
    rows = []
    for m in res.get("methods", []):
        t = res["top_k"][m]
        cells = []
        for key in ("mean_length", "kl_vs_sft", "kl_vs_sft_per_token"):
            s = t["run_level"][key]
            cells.append("<td>—</td>" if not s.get("n") else
                         f'<td><span class="v">{fmt(s["median"])}</span><span class="ci">'
                         f'{fmt(s["min"])} … {fmt(s["max"])}</span></td>')
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(m, "#888")}"></span>{esc(m)}</th><td>{len(t["runs"])}</td>'
                    + "".join(cells) + "</tr>")
    table = ('<table class="metrics"><thead><tr><th>method</th><th>runs</th><th>mean length'
             '</th><th>KL to SFT</th><th>KL / token</th></tr></thead><tbody>' + "".join(rows)
             + '</tbody></table>')
    charts = []
    for field, label in (("length", "response length (tokens)"),
                         ("kl_per_token", "KL to SFT per token (nats)")):
        groups = [{"label": m, "stats": (res["top_k"][m].get("per_prompt") or {}).get(field),
                   "points": [], "color": colors.get(m)} for m in res.get("methods", [])]
        if any(g["stats"] and g["stats"].get("n") for g in groups):
            charts.append(box_chart(groups, title=f"{label}, top {k}%", width=420))
    return (f'<p class="legend-note">The best {k}% of each method\'s runs (at least one). '
            'Table: median over those runs (min … max); charts: every response of those runs '
            'pooled (whiskers min–max).</p>' + table + '<div class="grid">'
            + "".join(f'<div class="cell">{c}</div>' for c in charts) + "</div>")


def _sensitivity_section(res: dict, colors: dict[str, str]) -> str:
    metric = res.get("metric", "mean_score")
    sens = (res.get("sensitivity") or {}).get(metric) or {}
    blocks = []
    for m in res.get("methods", []):
        params = sens.get(m) or {}
        if not params:
            continue
        charts, spreads = [], []
        for p, d in params.items():
            charts.append(value_chart(d["values"], title=f"{m}: {p.split('.')[-1]}",
                                      xlabel=p, ylabel=metric, color=colors.get(m, PALETTE[0])))
            spreads.append(f"{p}: {fmt(d.get('spread'))}")
        blocks.append(f'<h3>{esc(m)} <span class="kind">spread of the mean {esc(metric)} '
                      f'across values — {esc("; ".join(spreads))}</span></h3><div class="grid">'
                      + "".join(f'<div class="cell">{c}</div>' for c in charts) + "</div>")
    if not blocks:
        return '<p class="note">No hyperparameter took more than one value.</p>'
    return ('<p class="legend-note">Mean ' + esc(metric) + ' of the runs at each value (the '
            'other parameters vary), with a bar from the worst to the best of those runs. The '
            'larger the spread, the more the method depends on tuning this parameter.</p>'
            + "".join(blocks))


def _scatter_trials(res: dict, records: list[dict], colors: dict[str, str]) -> str:
    pts = []
    for r in records:
        x, y = metric_of(r, "kl_vs_sft"), metric_of(r, res.get("metric", "mean_score"))
        if x is not None and y is not None:
            pts.append({"x": x, "y": y, "color": colors.get(r.get("method"), PALETTE[0]),
                        "label": f"{r.get('id')}: KL {fmt(x)}, score {fmt(y)}"})
    if not pts:
        return '<p class="note">No finished run with a KL to SFT.</p>'
    return trials_scatter(pts, [(m, colors.get(m, "#888")) for m in res.get("methods", [])],
                          title="Every run: gold score vs KL to SFT",
                          xlabel="KL(π ‖ π_sft), nats per response",
                          ylabel="mean gold score",
                          baseline=(res.get("baseline") or {}).get("mean_score"))


def _trials_table(info: dict, records: list[dict], colors: dict[str, str]) -> str:
    by_id = {r.get("id"): r for r in records}
    head = "".join(f"<th>{esc(h)}</th>" for k, h, _, _ in METRIC_COLUMNS if k in EVAL_METRICS)
    rows = []
    for t in info.get("trials") or [{"id": r.get("id"), "method": r.get("method"),
                                     "params": r.get("params")} for r in records]:
        r = by_id.get(t.get("id"))
        m = t.get("method")
        sw = f'<span class="swatch" style="background:{colors.get(m, "#888")}"></span>'
        if r is None:
            status, cells = '<td class="status not-run">not run</td>', \
                f'<td colspan="{len(EVAL_METRICS)}"></td>'
        elif r.get("status") != "ok":
            status = '<td class="status failed">failed</td>'
            cells = f'<td colspan="{len(EVAL_METRICS)}" class="err-msg">{esc(str(r.get("error")))}</td>'
        else:
            status = '<td class="status complete">ok</td>'
            cells = "".join(f"<td>{fmt((r.get('metrics') or {}).get(k))}</td>"
                            for k, _, _, _ in METRIC_COLUMNS if k in EVAL_METRICS)
        secs = fmt(r.get("seconds"), 1) if r is not None and _finite(r.get("seconds")) else "—"
        link = _trial_link(info, t.get("id")) if r is not None else esc(str(t.get("id")))
        rows.append(f'<tr><th class="model">{sw}{esc(str(m))}</th>'
                    f'<td class="id">{link}</td>'
                    f'<td class="params">{esc(_params_text(t.get("params")))}</td>{status}'
                    f'{cells}<td>{secs}</td></tr>')
    return (f'<table class="metrics trials"><thead><tr><th>method</th><th>trial</th>'
            f'<th>parameters</th><th>status</th>{head}<th>seconds</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


SWEEP_CSS = """
ul.facts { margin: 6px 0 0; padding-left: 18px; }
td.params { text-align: left; font-size: 12px; }
td.id { text-align: left; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
td.id a, th a { color: #0969da; text-decoration: none; }
td.status { white-space: nowrap; }
td.status.failed { color: #cf222e; }
td.err-msg { text-align: left; color: #cf222e; font-size: 12px; }
td.diag { color: var(--muted); text-align: center; }
table.h2h td { text-align: center; min-width: 80px; }
table.metrics td .ci { display: block; color: var(--muted); font-size: 11px; }
svg .box { fill-opacity: 0.25; stroke-width: 1.5; }
svg .whisker { stroke-width: 1.3; fill: none; }
svg .median { stroke: #1f2328; stroke-width: 2; }
svg .dot { fill-opacity: 0.8; }
"""


def render_sweep_report(sweep_dir: str | Path, res: dict | None = None) -> str:
    """The sweep page of ``sweep_dir`` as an HTML string (``res``: its analysis, computed
    with :func:`starpo.metrics.analysis.analyze_dir` when not given)."""
    sweep_dir = Path(sweep_dir)
    info = _read_json(sweep_dir / "sweep.json")
    info = info if isinstance(info, dict) else {}
    res = res if res is not None else analyze_dir(sweep_dir)
    ids = [t.get("id") for t in info.get("trials", []) if isinstance(t, dict)] or None
    records = latest_records(fileio.read_jsonl(sweep_dir / "trials.jsonl"), ids)
    name = str(info.get("name") or sweep_dir.name)
    # colours by the sweep file's methods, so a method keeps its colour before it has runs
    planned = [m for m in (info.get("methods") or {}) if isinstance(m, str)]
    colors = _model_colors(planned + [m for m in res.get("methods", []) if m not in planned])
    nav = ["best", "expected", "robustness", "head-to-head", "top-k", "sensitivity",
           "score-kl", "trials"]
    labels = {"head-to-head": "head to head", "top-k": f"top {_k_text(res)}%",
              "score-kl": "score vs KL"}
    shared = sweep_dir / "shared" / "report.html"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>starpo sweep: {esc(name)}</title><style>{CSS}{SWEEP_CSS}</style></head>"
        "<body><main>",
        f"<h1>starpo sweep: {esc(name)}</h1>",
        f'<p class="sub">{esc(str(sweep_dir.resolve()))} · written '
        f'{esc(time.strftime("%Y-%m-%d %H:%M:%S"))}'
        + (' · <a href="shared/report.html">shared stages report</a>' if shared.is_file()
           else "") + "</p>",
        "<nav>" + "".join(f'<a href="#{n}">{esc(labels.get(n, n))}</a>' for n in nav)
        + "</nav>",
        _sweep_summary(info, res, records),
    ]
    if not records:
        parts.append('<p class="note">No trial has finished yet.</p>')
    parts += [
        '<section id="best"><h2>Best run per method</h2>', _best_table(info, res, colors),
        '<p class="legend-note">Best = highest ' + esc(str(res.get("metric"))) + ' over the '
        'method\'s grid. The last column compares with the best run of '
        + esc(str(res.get("reference_method"))) + ' in percent, as the guide does.</p>'
        '</section>',
        '<section id="expected"><h2>Expected performance over the grid</h2>',
        _expected_section(res, records, colors), "</section>",
        '<section id="robustness"><h2>Runs worse than SFT</h2>',
        _robustness_table(res, colors),
        '<p class="legend-note">Worse = ' + esc(str(res.get("metric"))) + ' below the SFT '
        'model\'s. A failed trial (diverged, NaN) counts as worse in the last column.</p>'
        '</section>',
        '<section id="head-to-head"><h2>Head to head, prompt by prompt</h2>'
        '<p class="legend-note">How often the row\'s run gets a higher gold score than the '
        'column\'s on the same prompt (ties ½).</p>',
        _h2h_table((res.get("head_to_head") or {}).get("best"), info, "Best runs"),
        _h2h_table((res.get("head_to_head") or {}).get("percentile"), info,
                   f"{fmt(100 * (res.get('percentile') or 0.75), 0)}th-percentile runs"),
        "</section>",
        f'<section id="top-k"><h2>Length and KL of the top {_k_text(res)}% '
        'runs</h2>', _topk_section(res, colors), "</section>",
        '<section id="sensitivity"><h2>Sensitivity to each hyperparameter</h2>',
        _sensitivity_section(res, colors), "</section>",
        '<section id="score-kl"><h2>Score vs KL</h2>', _scatter_trials(res, records, colors),
        "</section>",
        '<section id="trials"><h2>All trials</h2>', _trials_table(info, records, colors),
        "</section>",
        "<footer>Generated by starpo. Self-contained: no scripts, no network. The numbers "
        "are in analysis.json and trials.jsonl next to this file.</footer>",
        "</main></body></html>"]
    return "\n".join(parts)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Analyse a sweep directory and write ``analysis.json`` and ``report.html`` (both
    atomically, from the same analysis); returns the report's path."""
    sweep_dir = Path(sweep_dir)
    if not is_sweep_dir(sweep_dir):
        raise StarpoError(f"{sweep_dir}: not a sweep directory (no sweep.json)")
    res = analyze_dir(sweep_dir)
    fileio.write_json(sweep_dir / "analysis.json", res)
    return fileio.write_text(sweep_dir / "report.html", render_sweep_report(sweep_dir, res))
