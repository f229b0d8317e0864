"""Inline-SVG charts, number formatting and the page style shared by the run and sweep
pages (no plotting library: a chart is a few lines of path data on a ``viewBox``, so the
page scales with the window and prints cleanly)."""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable, Sequence

from starpo.metrics import registry

esc = html.escape

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
           "#ff9da7", "#9c755f", "#7f7f7f"]


def model_colors(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


# =========================================================================== formatting


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, digits: int | None = None) -> str:
    """A number for a table cell: about 3 significant digits (``digits`` fixes the
    decimals), ``—`` for missing."""
    if not finite(v):
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


def signed(v: Any, digits: int = 3) -> str:
    """A difference with its sign (``+0.111``, ``−0.042``); one that rounds to zero prints
    as ``0.000``, never ``-0.000`` (a sign the value does not have)."""
    if not finite(v):
        return "—"
    if round(v, digits) == 0:
        return f"{0:.{digits}f}"
    return f"{v:+.{digits}f}".replace("-", "−")


def pct(v: Any) -> str:
    return f"{100 * v:.0f}%" if finite(v) else "—"


def fmt_metric(metric: registry.Metric, v: Any) -> str:
    """A value of ``metric`` for a table cell: a percentage or a number, as it asks."""
    return pct(v) if metric.percent else fmt(v)


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

def value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


# =========================================================================== charts


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str = "step", width: int = 380, height: int = 230,
               colors: Sequence[str] = PALETTE,
               marks: Sequence[tuple[float, str]] = ()) -> str:
    """Lines of (label, xs, ys); non-finite values break a line. A legend when > 1 series.
    ``marks``: (x, label) of events on the x axis (an online stage's round starts), each a
    dashed vertical line."""
    xs = [x for _, sx, _ in series for x in sx if finite(x)]
    ys = [y for _, _, sy in series for y in sy if finite(y)]
    legend = len(series) > 1
    fr = _Frame(width, height, xs, ys, top=48 if legend else 30)
    body = fr.axes(title, xlabel, title_y=16 if legend else None)
    for x, label in marks:
        if finite(x) and fr.x0 <= x <= fr.x1:
            px = _num(fr.px(x))
            body.append(f'<line class="mark" x1="{px}" x2="{px}" y1="{fr.t}" '
                        f'y2="{fr.h - fr.b}"><title>{esc(label)}</title></line>'
                        f'<text class="tick" x="{_num(fr.px(x) + 3)}" y="{fr.t + 10}">'
                        f'{esc(label)}</text>')
    for k, (label, sx, sy) in enumerate(series):
        color = colors[k % len(colors)]
        pts = [(x, y) for x, y in zip(sx, sy)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in pts:
            if finite(x) and finite(y):
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
        xs += [p["x"]] + [v for v in (p.get("xci") or []) if finite(v)]
        ys += [p["y"]] + [v for v in (p.get("yci") or []) if finite(v)]
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
        if xci and all(finite(v) for v in xci):
            a, b = fr.px(xci[0]), fr.px(xci[1])
            body.append(f'<path class="err" d="M{_num(a)},{_num(cy)} L{_num(b)},{_num(cy)} '
                        f'M{_num(a)},{_num(cy - 4)} L{_num(a)},{_num(cy + 4)} '
                        f'M{_num(b)},{_num(cy - 4)} L{_num(b)},{_num(cy + 4)}" '
                        f'stroke="{c}"/>')
        if yci and all(finite(v) for v in yci):
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


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in bins ``[edges[i], edges[i+1])``; the last bin also takes
    every value at or beyond its left edge (the overflow of an axis cut short)."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        if not finite(v):
            continue
        i = 0
        while i < len(counts) - 1 and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    return counts


def histogram_chart(values: Sequence[float], edges: Sequence[float], *, title: str,
                    color: str, ymax: float, xlabel: str = "tokens", width: int = 300,
                    height: int = 200, mean: float | None = None) -> str:
    """Counts of ``values`` in bins ``[edges[i], edges[i+1])`` (:func:`bin_counts`: the last
    bar holds everything from its left edge up, which its hover text says when values lie
    beyond ``edges[-1]``)."""
    counts = bin_counts(values, edges)
    overflow = any(finite(v) and v > edges[-1] for v in values)
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
        span = (f"≥ {edges[i]:g}" if overflow and i == len(counts) - 1
                else f"{edges[i]:g}–{edges[i + 1]:g}")
        body.append(f'<rect class="bar" x="{_num(x0 + 0.5)}" y="{_num(y)}" '
                    f'width="{_num(max(x1 - x0 - 1, 0.8))}" height="{_num(fr.py(0) - y)}" '
                    f'fill="{color}"><title>{span} tokens: {c}</title></rect>')
    if mean is not None and finite(mean):
        # a mean beyond a cut axis sits on its right edge, labelled with its value
        mx = fr.px(min(max(mean, edges[0]), edges[-1]))
        body.append(f'<line class="meanline" x1="{_num(mx)}" x2="{_num(mx)}" y1="{fr.t}" '
                    f'y2="{fr.h - fr.b}"/><text class="tick" x="{_num(mx + 3)}" '
                    f'y="{fr.t + 10}">mean {fmt(mean, 1)}</text>')
    return _svg(width, height, body, "chart hist-chart", title)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation between order statistics."""
    vals = sorted(v for v in values if finite(v))
    if not vals:
        return float("nan")
    pos = (len(vals) - 1) * q / 100
    i = math.floor(pos)
    j = min(i + 1, len(vals) - 1)
    return vals[i] + (vals[j] - vals[i]) * (pos - i)


# length histograms: the axis stops at this percentile of all lengths when the longest
# responses would otherwise squash the rest into a few bars (a few runaway 256-token
# responses next to a bulk under 40); the last bar then holds the longer ones
LENGTH_CLIP_PERCENTILE = 99.0


def length_axis_cut(all_values: Sequence[float], q: float = LENGTH_CLIP_PERCENTILE
                    ) -> float | None:
    """Where a length axis stops, or None when the whole range fits: the ``q``-th
    percentile when the values beyond it stretch the axis by more than half again."""
    vals = [v for v in all_values if finite(v)]
    if len(vals) < 20:
        return None
    cut, lo, hi = percentile(vals, q), min(vals), max(vals)
    if hi - lo <= 1.5 * (cut - lo) + 1:
        return None
    return cut


def length_bins(all_values: Sequence[float], target: int = 24,
                upper: float | None = None) -> list[float]:
    """Shared integer-aligned bin edges for length histograms (about ``target`` bins),
    up to ``upper`` when given (values beyond it belong in the last bin)."""
    vals = [v for v in all_values if finite(v)]
    if upper is not None and finite(upper):
        vals = [v for v in vals if v <= upper] or vals
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
        ys += [s["min"], s["max"]] + [p for p in g.get("points") or [] if finite(p)]
    if finite(baseline):
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
            if not finite(p):
                continue
            # spread the dots sideways so equal values stay visible (deterministic)
            off = ((j % 7) - 3) / 3 * half * 0.9
            body.append(f'<circle class="dot" cx="{_num(fr.px(cx + half * 1.6 + off / 3))}" '
                        f'cy="{_num(fr.py(p))}" r="2.6" fill="{c}"><title>{esc(str(pid))}: '
                        f'{fmt(p)}</title></circle>')
        body.append(f'<text class="label" x="{_num(xm)}" y="{fr.h - fr.b + 16}" '
                    f'text-anchor="middle">{esc(g["label"])}</text>')
    if finite(baseline):
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
    numeric = all(finite(v) for v in vals)
    log = numeric and min(vals) > 0 and max(vals) / min(vals) > 20
    if numeric:
        xs = [math.log10(v) if log else float(v) for v in vals]
    else:
        xs = [float(i) for i in range(len(vals))]
    ys = [y for r in rows for y in (r.get("min"), r.get("max"), r.get("mean")) if finite(y)]
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.12 or 0.5
    fr = _Frame(width, height, [lo - pad, hi + pad], ys or [0.0, 1.0],
                xticks=[lo - pad, hi + pad], bottom=44)
    fr.xt = []
    body = fr.axes(title, xlabel, ylabel)
    pts = []
    for x, r in zip(xs, rows):
        px = fr.px(x)
        if finite(r.get("min")) and finite(r.get("max")):
            body.append(f'<path class="err" d="M{_num(px)},{_num(fr.py(r["min"]))} '
                        f'L{_num(px)},{_num(fr.py(r["max"]))}" stroke="{color}"/>')
        if finite(r.get("mean")):
            pts.append((px, fr.py(r["mean"])))
            fail = f", {r['failed']} failed" if r.get("failed") else ""
            body.append(f'<circle cx="{_num(px)}" cy="{_num(fr.py(r["mean"]))}" r="3.5" '
                        f'fill="{color}"><title>{esc(value_text(r["value"]))}: mean '
                        f'{fmt(r["mean"])} over {r.get("n")} runs (min {fmt(r.get("min"))}, max '
                        f'{fmt(r.get("max"))}){fail}</title></circle>')
        elif r.get("failed"):
            body.append(f'<text class="tick" x="{_num(px)}" y="{fr.t + 12}" '
                        f'text-anchor="middle">failed</text>')
        body.append(f'<text class="tick" x="{_num(px)}" y="{fr.h - fr.b + 14}" '
                    f'text-anchor="middle">{esc(value_text(r["value"]))}</text>')
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
    ys = [p["y"] for p in points] + ([float(baseline)] if finite(baseline) else [])
    fr = _Frame(width, height, xs, ys, left=62, bottom=46, top=48)
    body = fr.axes(title, xlabel, ylabel, title_y=16)
    for k, (name, color) in enumerate(legend):
        lx = fr.l + k * 120
        body.append(f'<rect x="{lx}" y="{fr.t - 19}" width="10" height="10" fill="{color}"/>'
                    f'<text class="legend" x="{lx + 14}" y="{fr.t - 10}">{esc(name)}</text>')
    if finite(baseline):
        body.append(_baseline_line(fr, float(baseline), "SFT"))
    for p in points:
        body.append(f'<circle class="pt" cx="{_num(fr.px(p["x"]))}" cy="{_num(fr.py(p["y"]))}" '
                    f'r="5" fill="{p["color"]}"><title>{esc(p["label"])}</title></circle>')
    return _svg(width, height, body, "chart scatter-chart", title)



def interval_chart(series: Sequence[tuple[str, Sequence[Any], Sequence[Any], Sequence[Any],
                                          Sequence[Any]]], *, title: str, xlabel: str = "",
                   ylabel: str = "", categories: Sequence[str] | None = None,
                   baseline: float | None = None, baseline_label: str = "SFT",
                   width: int = 460, height: int = 260,
                   colors: Sequence[str] = PALETTE) -> str:
    """Means with 95% intervals: series ``(label, xs, means, lows, highs)``, each a line
    through its means with an error bar at every point. With ``categories`` the xs are
    indices into it (labels under the axis, series side by side at each one); otherwise
    numeric. A legend when > 1 series; a dashed line marks ``baseline``."""
    cat = categories is not None
    ys = [v for _, _, m, lo, hi in series for v in (*m, *lo, *hi) if finite(v)]
    if finite(baseline):
        ys.append(float(baseline))
    if cat:
        xs = [-0.5, len(categories) - 0.5]
    else:
        xs = [float(x) for _, sx, _, _, _ in series for x in sx if finite(x)]
        if xs:
            pad = (max(xs) - min(xs)) * 0.05 or 0.5
            xs = [min(xs) - pad, max(xs) + pad]
    legend = len(series) > 1
    fr = _Frame(width, height, xs, ys, top=48 if legend else 30, bottom=52 if cat else 40,
                xticks=xs if cat else None)
    if cat:
        fr.xt = []
    body = fr.axes(title, xlabel, ylabel, title_y=16 if legend else None)
    step = 0.5 / max(len(series), 1) if cat else 0.0
    for k, (label, sx, means, lows, highs) in enumerate(series):
        color = colors[k % len(colors)]
        shift = (k - (len(series) - 1) / 2) * step
        pts = []
        for x, m, lo, hi in zip(sx, means, lows, highs):
            if not (finite(x) and finite(m)):
                continue
            px, py = fr.px(float(x) + shift), fr.py(float(m))
            pts.append((px, py))
            if finite(lo) and finite(hi):
                a, b = fr.py(float(lo)), fr.py(float(hi))
                body.append(f'<path class="err" d="M{_num(px)},{_num(a)} L{_num(px)},{_num(b)} '
                            f'M{_num(px - 3)},{_num(a)} L{_num(px + 3)},{_num(a)} '
                            f'M{_num(px - 3)},{_num(b)} L{_num(px + 3)},{_num(b)}" '
                            f'stroke="{color}"/>')
            where = categories[int(x)] if cat else f"{float(x):g}"
            ci = f" [{fmt(lo)}, {fmt(hi)}]" if finite(lo) and finite(hi) else ""
            body.append(f'<circle cx="{_num(px)}" cy="{_num(py)}" r="3.2" fill="{color}">'
                        f'<title>{esc(label)} {esc(where)}: {fmt(m)}{ci}</title></circle>')
        if len(pts) >= 2 and not cat:
            d = " ".join(f"{'M' if i == 0 else 'L'}{_num(x)},{_num(y)}"
                         for i, (x, y) in enumerate(pts))
            body.append(f'<path class="line" d="{d}" stroke="{color}"/>')
        if legend:
            lx = fr.l + k * 130
            body.append(f'<rect x="{lx}" y="{fr.t - 19}" width="10" height="10" '
                        f'fill="{color}"/><text class="legend" x="{lx + 14}" '
                        f'y="{fr.t - 10}">{esc(label)}</text>')
    if cat:
        for i, name in enumerate(categories):
            body.append(f'<text class="label" x="{_num(fr.px(float(i)))}" '
                        f'y="{fr.h - fr.b + 16}" text-anchor="middle">{esc(name)}</text>')
    if finite(baseline):
        body.append(_baseline_line(fr, float(baseline), baseline_label))
    return _svg(width, height, body, "chart interval-chart", title)

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
ul.summary { margin: 6px 0; padding-left: 20px; max-width: 980px; }
ul.summary li { margin: 3px 0; }
ul.summary li.pick { margin-top: 8px; }
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
svg .mark { stroke: #8c959f; stroke-dasharray: 2 3; stroke-width: 1; }
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
