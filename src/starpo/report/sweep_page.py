"""The sweep page: ``starpo report DIR`` on a sweep directory (``sweep.json``, written by
``starpo sweep``) renders the robustness analysis of :mod:`starpo.metrics.analysis` (best
run per method, expected performance over the grid, runs worse than SFT, head-to-head win
rates, length and KL of the top-k% runs, sensitivity to each hyperparameter) as tables and
charts, and links every trial to its own report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from starpo import fileio
from starpo.errors import StarpoError
from starpo.metrics import registry
from starpo.metrics.analysis import TOPK_METRICS, analyze_dir, latest_records, metric_of
from starpo.report.charts import (CSS, PALETTE, box_chart, esc, finite, fmt, fmt_metric,
                                  model_colors, pct, trials_scatter, value_chart, value_text)


def is_sweep_dir(path: str | Path) -> bool:
    """A sweep directory (``starpo sweep`` writes ``sweep.json`` first)."""
    return (Path(path) / "sweep.json").is_file()


def _k_text(res: dict) -> str:
    """k of the top-k% runs as written in titles (25, 12.5)."""
    k = res.get("top_k_percent")
    return f"{k:g}" if finite(k) else "?"


def _params_text(params: dict | None) -> str:
    return ", ".join(f"{k.split('.')[-1]}={value_text(v)}" for k, v in (params or {}).items())


def _trial_link(info: dict, tid: Any) -> str:
    """The trial id linked to the trial's own report (relative, works offline)."""
    if tid is None:
        return "—"
    d = next((t.get("dir") for t in info.get("trials", []) if t.get("id") == tid), None)
    d = d or f"trials/{tid}"
    return f'<a href="{esc(d)}/report.html">{esc(str(tid))}</a>'


def _heat(v: Any) -> str:
    """Background for a win rate: red below ½, green above, white at ½."""
    if not finite(v):
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
    if finite(base.get("mean_score")):
        facts.append(f"SFT baseline: mean score {fmt(base['mean_score'])}, length "
                     f"{fmt(base.get('mean_length'))} ({res.get('baseline_source')})")
    else:
        facts.append("no SFT baseline (no evaluation of an SFT model)")
    facts.append(f"best = highest {res.get('metric')}; top {_k_text(res)}% "
                 f"runs; head to head also between the "
                 f"{fmt(100 * (res.get('percentile') or 0.75), 0)}th-percentile runs")
    return "<ul class=\"facts\">" + "".join(f"<li>{esc(f)}</li>" for f in facts) + "</ul>"


def _metric_head() -> str:
    return "".join(f"<th>{esc(m.header)}</th>" for m in registry.sweep_metrics())


def _metric_cells(values: dict) -> str:
    return "".join(f"<td>{fmt_metric(m, values.get(m.name))}</td>"
                   for m in registry.sweep_metrics())


def _best_table(info: dict, res: dict, colors: dict[str, str]) -> str:
    ref = res.get("reference_method")
    head = _metric_head()
    rows = []
    for m in res.get("methods", []):
        b = (res.get("best") or {}).get(m)
        if not b:
            rows.append(f'<tr><th class="model">{esc(m)}</th><td colspan="'
                        f'{len(registry.sweep_metrics()) + 3}" class="note">no finished run</td></tr>')
            continue
        cells = _metric_cells(b["metrics"])
        vs = b.get("vs_sft") or {}
        vr = b.get("vs_reference") or {}
        d_sft = fmt(vs.get("mean_score")) if finite(vs.get("mean_score")) else "—"
        pct = "—"
        if m != ref and (finite(vr.get("mean_score_pct")) or finite(vr.get("mean_length_pct"))):
            pct = (f"score {vr.get('mean_score_pct', 0):+.1f}%, length "
                   f"{vr.get('mean_length_pct', 0):+.1f}%") if finite(
                vr.get("mean_score_pct")) and finite(vr.get("mean_length_pct")) else "—"
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(m, "#888")}"></span>{esc(m)}</th>'
                    f'<td class="id">{_trial_link(info, b["id"])}</td>'
                    f'<td class="params">{esc(_params_text(b.get("params")))}</td>{cells}'
                    f'<td>{d_sft}</td><td>{esc(pct)}</td></tr>')
    return (f'<table class="metrics"><thead><tr><th>method</th><th>best run</th>'
            f'<th>parameters</th>{head}<th>score − SFT</th><th>vs best {esc(str(ref))}</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


# the metrics whose distribution over each method's grid is drawn (the table has them all)
EXPECTED_CHARTS = ("mean_score", "win_vs_sft", "kl_vs_sft", "mean_length")


def _spread_cell(metric: registry.Metric, s: dict) -> str:
    """A metric's distribution over a grid (:func:`starpo.metrics.analysis.describe`)."""
    if not s.get("n"):
        return "<td>—</td>"
    f = [fmt_metric(metric, s[k]) for k in ("median", "q25", "q75", "min", "max")]
    return (f'<td><span class="v">{f[0]}</span><span class="ci">[{f[1]}, {f[2]}]</span>'
            f'<span class="ci">{f[3]} … {f[4]}</span></td>')


def _expected_section(res: dict, records: list[dict], colors: dict[str, str]) -> str:
    base = res.get("baseline") or {}
    charts = []
    for key in EXPECTED_CHARTS:
        groups = []
        for m in res.get("methods", []):
            ok = [r for r in records if r.get("method") == m and r.get("status") == "ok"]
            groups.append({"label": m, "stats": res["expected"][m][key],
                           "points": [metric_of(r, key) for r in ok],
                           "ids": [r.get("id") for r in ok], "color": colors.get(m)})
        bl = base.get(key) if key in ("mean_score", "mean_length") else None
        charts.append(box_chart(groups, title=registry.get(key).axis_label, baseline=bl,
                                width=300))
    head = _metric_head()
    rows = []
    for m in res.get("methods", []):
        cells = []
        for metric in registry.sweep_metrics():
            cells.append(_spread_cell(metric, res["expected"][m].get(metric.name) or {}))
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
                    f'<td>{pct(r.get("share_worse"))}</td>'
                    f'<td>{pct(r.get("share_worse_or_failed"))}</td></tr>')
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
            tie = f'<span class="tie">ties {100 * w["tie"]:.0f}%</span>' if finite(
                w.get("tie")) else ""
            cells.append(f'<td{_heat(w.get("win"))}><span class="v">{pct(w.get("win"))}'
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
        for key in TOPK_METRICS:
            s = t["run_level"][key]
            cells.append("<td>—</td>" if not s.get("n") else
                         f'<td><span class="v">{fmt(s["median"])}</span><span class="ci">'
                         f'{fmt(s["min"])} … {fmt(s["max"])}</span></td>')
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(m, "#888")}"></span>{esc(m)}</th><td>{len(t["runs"])}</td>'
                    + "".join(cells) + "</tr>")
    head = "".join(f"<th>{esc(registry.get(key).header)}</th>" for key in TOPK_METRICS)
    table = ('<table class="metrics"><thead><tr><th>method</th><th>runs</th>' + head +
             '</tr></thead><tbody>' + "".join(rows) + '</tbody></table>')
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
    head = _metric_head()
    width = len(registry.sweep_metrics())
    rows = []
    for t in info.get("trials") or [{"id": r.get("id"), "method": r.get("method"),
                                     "params": r.get("params")} for r in records]:
        r = by_id.get(t.get("id"))
        m = t.get("method")
        sw = f'<span class="swatch" style="background:{colors.get(m, "#888")}"></span>'
        if r is None:
            status, cells = '<td class="status not-run">not run</td>', \
                f'<td colspan="{width}"></td>'
        elif r.get("status") != "ok":
            status = '<td class="status failed">failed</td>'
            cells = f'<td colspan="{width}" class="err-msg">{esc(str(r.get("error")))}</td>'
        else:
            status = '<td class="status complete">ok</td>'
            cells = _metric_cells(r.get("metrics") or {})
        secs = fmt(r.get("seconds"), 1) if r is not None and finite(r.get("seconds")) else "—"
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
    info = fileio.read_json(sweep_dir / "sweep.json")
    info = info if isinstance(info, dict) else {}
    res = res if res is not None else analyze_dir(sweep_dir)
    ids = [t.get("id") for t in info.get("trials", []) if isinstance(t, dict)] or None
    records = latest_records(fileio.read_jsonl(sweep_dir / "trials.jsonl"), ids)
    name = str(info.get("name") or sweep_dir.name)
    # colours by the sweep file's methods, so a method keeps its colour before it has runs
    planned = [m for m in (info.get("methods") or {}) if isinstance(m, str)]
    colors = model_colors(planned + [m for m in res.get("methods", []) if m not in planned])
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
