"""``DIR/report.html``: one self-contained page about a run (no network, no JavaScript).

Contents, each part present when its data exists:

* a summary on one screen: the stages' status, what the paired score gaps say and which
  model to pick and why, in words (:mod:`starpo.report.verdict`);
* the stages of the run (type, status, steps, time, last logged values, the held-out
  preference accuracy before → after of a preference stage);
* for every evaluation (a stage directory holding ``summary.json``, ``eval/`` by default):
  the metrics table with bootstrap 95% intervals, a score-vs-KL scatter (one point per
  model, with its intervals as error bars), the response-length histograms of every
  model on shared axes (cut at the 99th percentile of the lengths when a few long
  responses would squash the rest; the page says so), and a few prompts with every
  model's response side by side;
* training curves of every stage (each numeric column of ``DIR/<stage>/metrics.jsonl``
  against ``step``; an online stage's file holds all its rounds, whose starts are marked;
  its per-round files are drawn only while the stage has no file of its own yet).

A sweep directory gets the sweep page instead (:mod:`starpo.report.sweep_page`); charts
are :mod:`starpo.report.charts`'.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from starpo import fileio
from starpo.metrics import registry
from starpo.report.charts import (CSS, LENGTH_CLIP_PERCENTILE, PALETTE, bin_counts, esc,
                                  finite, fmt, fmt_metric, histogram_chart, length_axis_cut,
                                  length_bins, line_chart, model_colors, nice_ticks,
                                  scatter_chart, signed)
from starpo.report.verdict import gap_word, pick_model, verdict_lines


# curve keys drawn together in one chart, and the order charts appear in
CURVE_GROUPS = [
    ("loss",), ("reward_accuracy",), ("reward_margin",), ("reward_chosen", "reward_rejected"),
    ("logp_chosen", "logp_rejected"), ("token_prob_margin",), ("len_chosen", "len_rejected"),
    ("grad_norm",), ("lr",), ("tokens_per_s",), ("trained_tokens",),
]
# not metrics: the x axis, bookkeeping, and an online stage's round counters (its rounds
# are marked on the curves instead)
CURVE_SKIP = {"step", "epoch", "elapsed_s", "round", "round_step"}

SAMPLE_PROMPTS = 4



# =========================================================================== reading


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
    """The stage's ``metrics.jsonl``; without one (an online stage still running), those
    of its sub-runs (its rounds so far), checkpoints aside. A finished online stage's own
    file holds every round's steps, so its rounds' files would only repeat it."""
    if not stage_dir.is_dir():
        return []
    if (stage_dir / "metrics.jsonl").is_file():
        return [stage_dir / "metrics.jsonl"]
    files: list[Path] = []
    for p in sorted(stage_dir.rglob("metrics.jsonl")):
        rel = p.relative_to(stage_dir).parts
        if p in files or any(part.startswith("checkpoint") or part.startswith(".")
                             for part in rel):
            continue
        files.append(p)
    return files

# =========================================================================== sections


def _ci(m: dict, key: str) -> list[float] | None:
    ci = m.get(f"{key}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(v) for v in ci):
        return [float(ci[0]), float(ci[1])]
    return None


def best_of_column(summary: dict[str, dict], key: str, reference: str | None) -> str | None:
    """The one model with the best (highest) value of metric ``key``, or None: a metric
    with no better direction, fewer than two values, or a tie at the precision the table
    shows (bold on one of two equal-looking numbers would pick a winner the page cannot
    show). The SFT reference's own value of a metric against SFT (½, 0) is not ranked."""
    metric = registry.get(key)
    if not metric.higher_is_better:
        return None
    vals = {n: m.get(key) for n, m in summary.items() if finite(m.get(key))
            and not (metric.against_sft and n == reference)}
    if len(vals) < 2:
        return None
    top = max(vals.values())
    shown = fmt_metric(metric, top)
    leaders = [n for n, v in vals.items() if fmt_metric(metric, v) == shown]
    return leaders[0] if len(leaders) == 1 else None


def _metrics_table(summary: dict[str, dict], colors: dict[str, str], reference: str | None
                   ) -> str:
    metrics = registry.METRICS
    best = {m.name: best_of_column(summary, m.name, reference) for m in metrics}
    head = "".join(f"<th>{esc(m.header)}</th>" for m in metrics)
    rows = []
    for name, row in summary.items():
        cells = []
        for metric in metrics:
            v = row.get(metric.name)
            cls = ' class="best"' if best[metric.name] == name else ""
            ci = _ci(row, metric.name)
            txt = f'<span class="v">{fmt_metric(metric, v)}</span>'
            if ci:
                txt += (f'<span class="ci">[{fmt_metric(metric, ci[0])}, '
                        f'{fmt_metric(metric, ci[1])}]</span>')
            if metric.tie and finite(row.get(metric.tie)):
                txt += f'<span class="tie">ties {row[metric.tie] * 100:.0f}%</span>'
            cells.append(f"<td{cls}>{txt}</td>")
        ref = ' <span class="tag">reference</span>' if name == reference else ""
        rows.append(f'<tr><th class="model"><span class="swatch" style="background:'
                    f'{colors.get(name, "#888")}"></span>{esc(name)}{ref}</th>'
                    f'<td class="n">{fmt(row.get("n"), 0)}</td>' + "".join(cells) + "</tr>")
    return (f'<table class="metrics"><thead><tr><th>model</th><th>prompts</th>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _metrics_legend() -> str:
    """The metrics' explanations (each said once, in the registry's order)."""
    said = list(dict.fromkeys(m.description for m in registry.METRICS if m.description))
    return ('<p class="legend-note">' + esc("; ".join(said)) + (". " if said else "")
            + 'Best value of a column in bold (none where the best values look equal).</p>')


def _categories_table(cats: Any) -> str:
    """Mean score per prompt category (``categories.json``, MT-Bench): categories as rows,
    models as columns, each with its 95% interval."""
    if not isinstance(cats, dict) or not cats:
        return ""
    models = [m for m, per in cats.items() if isinstance(per, dict)]
    names = sorted({c for m in models for c in cats[m]})
    rows = []
    for c in names:
        cells = []
        for m in models:
            v = cats[m].get(c) if isinstance(cats[m].get(c), dict) else {}
            x, ci = v.get("mean_score"), v.get("mean_score_ci")
            ci_txt = (f'<span class="ci">[{ci[0]:.2f}, {ci[1]:.2f}]</span>'
                      if isinstance(ci, list) and len(ci) == 2 and all(finite(t) for t in ci)
                      else "")
            cells.append(f'<td><span class="v">{x:.3f}</span>{ci_txt}</td>' if finite(x)
                         else "<td>–</td>")
        n = next((cats[m][c].get("n") for m in models if isinstance(cats[m].get(c), dict)), "")
        rows.append(f"<tr><th>{esc(c)} <span class=\"ci\">({n})</span></th>{''.join(cells)}</tr>")
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    return ('<h3>Mean score by category</h3><table class="metrics"><thead><tr><th>category '
            f'(prompts)</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _gaps_table(gaps: Any) -> str:
    """Paired score gaps (``gaps.json``): one line per (model, baseline) pair."""
    rows = []
    for g in gaps if isinstance(gaps, list) else []:
        if not isinstance(g, dict) or not finite(g.get("gap")):
            continue
        ci = g.get("gap_ci")
        verdict = gap_word(ci) or ""
        ci_txt = f'<span class="ci">[{signed(ci[0])}, {signed(ci[1])}]</span>' if verdict else ""
        rows.append(f"<tr><th>{esc(str(g.get('model')))} − {esc(str(g.get('baseline')))}</th>"
                    f'<td><span class="v">{signed(g["gap"])}</span>{ci_txt}</td>'
                    f"<td>{esc(verdict)}</td></tr>")
    if not rows:
        return ""
    return ('<h3>Score gaps (paired over the same prompts)</h3><table class="metrics">'
            '<thead><tr><th>models</th><th>mean score gap [95% interval]</th>'
            f'<th>the first is</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _scatter_section(summary: dict[str, dict], colors: dict[str, str]) -> str:
    pts = []
    for name, m in summary.items():
        if finite(m.get("kl_vs_sft")) and finite(m.get("mean_score")):
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
    lengths = {n: [r.get("length") for r in recs if finite(r.get("length"))]
               for n, recs in records.items() if recs}
    lengths = {n: v for n, v in lengths.items() if v}
    if not lengths:
        return '<p class="note">No per-response records, so no length distributions.</p>'
    every = [v for vs in lengths.values() for v in vs]
    cut = length_axis_cut(every)
    edges = length_bins(every, upper=cut)
    ymax = max(max(bin_counts(vs, edges)) for vs in lengths.values())
    ymax = nice_ticks(0, ymax)[-1]
    charts = []
    for n, vs in lengths.items():
        mean = summary.get(n, {}).get("mean_length")
        if not finite(mean):
            mean = sum(vs) / len(vs)
        charts.append(histogram_chart(vs, edges, title=f"{n} (n={len(vs)})",
                                      color=colors.get(n, PALETTE[0]), ymax=ymax, mean=mean))
    note = ""
    if cut is not None:
        beyond = sum(v >= edges[-2] for v in every)
        over = sum(v > edges[-1] for v in every)
        note = (f'<p class="note">The axis stops at {edges[-1]:g} tokens (the '
                f'{LENGTH_CLIP_PERCENTILE:g}th percentile of all lengths is {cut:g}): '
                f'{over} of {len(every)} responses are longer, up to {max(every):g} tokens; '
                f'the last bar counts all {beyond} from {edges[-2]:g} tokens up. The means '
                f'are of every response.</p>')
    return note + '<div class="grid">' + \
        "".join(f'<div class="cell">{c}</div>' for c in charts) + "</div>"


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
        sc = [r[i].get("score") for r in lists if finite(r[i].get("score"))]
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
    recs = [r for r in recs if finite(r.get("step"))]
    if not recs:
        return []
    recs.sort(key=lambda r: r["step"])
    keys = []
    for r in recs:
        for k, v in r.items():
            if k not in CURVE_SKIP and k not in keys and finite(v):
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
    marks = round_marks(recs)
    charts = []
    for g in groups:
        series = [(k, steps, [float(r[k]) if finite(r.get(k)) else float("nan") for r in recs])
                  for k in g]
        title = " / ".join(g)
        charts.append(line_chart(series, title=title, marks=marks))
    return charts


def round_marks(recs: list[dict]) -> list[tuple[float, str]]:
    """Where each round after the first starts in an online stage's combined log (records
    with ``round``): at the last logged step of the round before, labelled ``round k``."""
    last: dict[int, float] = {}
    for r in recs:
        k = r.get("round")
        if finite(k) and finite(r.get("step")):
            last[int(k)] = max(last.get(int(k), float("-inf")), float(r["step"]))
    ks = sorted(last)
    return [(last[a], f"round {b}") for a, b in zip(ks, ks[1:])]


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


def _stage_info(run_dir: Path, name: str) -> tuple[str, dict]:
    """(status, stage.json's contents or {}) of a stage directory."""
    d = run_dir / name
    info = fileio.read_json(d / "stage.json") if (d / "stage.json").is_file() else None
    if isinstance(info, dict):
        return "complete", info
    if d.is_dir() and (d / "checkpoints").is_dir():
        return "partial", {}
    return ("started" if d.is_dir() else "not run"), {}


def stage_steps(info: dict) -> tuple[float | None, int]:
    """(optimizer steps, rounds) a stage trained: ``steps`` of its stage.json, or for an
    online stage the sum over its rounds."""
    rounds = [r for r in info.get("rounds") or [] if isinstance(r, dict)]
    if finite(info.get("steps")):
        return float(info["steps"]), len(rounds)
    per_round = [r.get("steps") for r in rounds if finite(r.get("steps"))]
    return (float(sum(per_round)) if per_round else None), len(rounds)


def _last_logged(run_dir: Path, name: str, info: dict) -> dict:
    """The stage's last logged training values: stage.json's ``final``, else (an online
    stage) the last line of its metrics.jsonl."""
    if isinstance(info.get("final"), dict):
        return info["final"]
    f = run_dir / name / "metrics.jsonl"
    recs = fileio.read_jsonl(f) if info and f.is_file() else []
    return recs[-1] if recs and isinstance(recs[-1], dict) else {}


def heldout_accuracy(info: dict) -> str:
    """``0.500 → 0.631 (249 pairs)``: a preference stage's held-out reward accuracy before
    and after training (stage.json's ``eval_before`` / ``eval_after``), or ``""``."""
    acc = [(info.get(k) or {}).get("reward_accuracy") if isinstance(info.get(k), dict)
           else None for k in ("eval_before", "eval_after")]
    if not all(finite(v) for v in acc):
        return ""
    pairs = f" ({info['eval_pairs']} pairs)" if finite(info.get("eval_pairs")) else ""
    return f"{acc[0]:.3f} → {acc[1]:.3f}{pairs}"


def _stages_table(run_dir: Path, stages: list[tuple[str, str]]) -> str:
    rows = []
    for name, kind in stages:
        status, info = _stage_info(run_dir, name)
        steps, rounds = stage_steps(info)
        steps_txt = fmt(steps, 0) if steps is not None else "—"
        if rounds > 1:
            steps_txt += f" ({rounds} rounds)"
        secs = info.get("seconds")
        final = _last_logged(run_dir, name, info)
        shown = [(k, final[k]) for k in ("loss", "reward_accuracy") if finite(final.get(k))]
        last = ", ".join(f"{k} {fmt(v)}" for k, v in shown)
        rows.append(f'<tr><th>{esc(name)}</th><td>{esc(kind)}</td>'
                    f'<td class="status {status.replace(" ", "-")}">{status}</td>'
                    f'<td>{esc(steps_txt)}</td>'
                    f'<td>{fmt(secs, 1) if finite(secs) else "—"}</td>'
                    f'<td>{esc(last) or "—"}</td>'
                    f'<td>{esc(heldout_accuracy(info)) or "—"}</td></tr>')
    return ('<table class="stages"><thead><tr><th>stage</th><th>type</th><th>status</th>'
            '<th>steps</th><th>seconds</th><th>last logged</th>'
            '<th>held-out reward accuracy</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _summary_section(run_dir: Path, stages: list[tuple[str, str]], evals: list[Path]) -> str:
    """The page's first screen: the stages' status, the paired gaps in words, the pick."""
    statuses = [_stage_info(run_dir, n)[0] for n, _ in stages]
    done = statuses.count("complete")
    if not stages:
        status_txt = "No stages found."
    elif done == len(stages):
        status_txt = f"All {len(stages)} stages are complete."
    else:
        rest = ", ".join(f"{n} {st}" for (n, _), st in zip(stages, statuses)
                         if st != "complete")
        status_txt = f"{done} of {len(stages)} stages are complete ({rest})."
    items = [f"<li>{esc(status_txt)}</li>"]
    if not evals:
        items.append("<li>No evaluation yet, so nothing to compare the models by.</li>")
        return ('<section id="summary"><h2>Summary</h2><ul class="summary">'
                + "".join(items) + "</ul></section>")
    d = evals[0]
    summary = fileio.read_json(d / "summary.json")
    summary = {str(k): v for k, v in summary.items() if isinstance(v, dict)} \
        if isinstance(summary, dict) else {}
    meta = fileio.read_json(d / "meta.json")
    meta = meta if isinstance(meta, dict) else {}
    gaps = fileio.read_json(d / "gaps.json")
    judge = f" by the {meta['judge']} judge" if meta.get("judge") else ""
    prompts = f" on {meta['prompts']} held-out prompts" if meta.get("prompts") else ""
    rel = d.relative_to(run_dir).as_posix()
    lines = verdict_lines(gaps)
    if lines:
        items.append(f"<li>Paired score gaps{judge}{prompts} (each model minus another on "
                     f"the same prompts, 95% interval; <code>{esc(rel)}/gaps.json</code>):"
                     "<ul>" + "".join(f"<li>{esc(t)}</li>" for t in lines) + "</ul></li>")
    else:
        items.append(f"<li>No paired score gaps in <code>{esc(rel)}/gaps.json</code>; "
                     f"compare the per-model intervals below with care (they overlap "
                     f"more than paired ones).</li>")
    pick = pick_model(summary, gaps, meta.get("reference"))
    if pick is not None:
        items.append(f'<li class="pick"><b>Pick {esc(pick.model)}</b>: {esc(pick.why)}.</li>')
    return ('<section id="summary"><h2>Summary</h2><ul class="summary">' + "".join(items)
            + "</ul></section>")


def _eval_dirs(run_dir: Path, stages: list[tuple[str, str]]) -> list[Path]:
    out = []
    for name, _ in stages:
        if (run_dir / name / "summary.json").is_file():
            out.append(run_dir / name)
    if (run_dir / "eval" / "summary.json").is_file() and run_dir / "eval" not in out:
        out.insert(0, run_dir / "eval")
    return out


def _eval_section(run_dir: Path, d: Path) -> str:
    summary = fileio.read_json(d / "summary.json")
    if not isinstance(summary, dict) or not summary:
        return f'<p class="note">{esc(str(d / "summary.json"))} is empty or unreadable.</p>'
    summary = {str(k): v for k, v in summary.items() if isinstance(v, dict)}
    meta = fileio.read_json(d / "meta.json")
    meta = meta if isinstance(meta, dict) else {}
    files = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    reference = meta.get("reference")
    records = {}
    for name in summary:
        f = d / str(files.get(name) or f"{fileio.safe_name(name)}.jsonl")
        records[name] = fileio.read_jsonl(f) if f.is_file() else []
    colors = model_colors(list(summary))
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
        + _metrics_table(summary, colors, reference)
        + _gaps_table(fileio.read_json(d / "gaps.json"))
        + _categories_table(fileio.read_json(d / "categories.json"))
        + _metrics_legend() +
        '<div class="two"><div class="cell">'
        + _scatter_section(summary, colors) + '</div><div class="cell">'
        '<h3>Response length</h3>' + _length_section(records, summary, colors) +
        '</div></div><h3>Sample responses</h3>' + _samples_section(records, colors) +
        "</section>")


def render_report(run_dir: str | Path) -> str:
    """The report page of ``run_dir`` as an HTML string."""
    run_dir = Path(run_dir)
    name, recipe_stages = _recipe_info(run_dir)
    stages = _stage_dirs(run_dir, recipe_stages)
    evals = _eval_dirs(run_dir, stages)
    nav = ['<a href="#summary">summary</a>', '<a href="#stages">stages</a>']
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
        _summary_section(run_dir, stages, evals),
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


def write_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    return fileio.write_text(Path(run_dir) / "report.html", render_report(run_dir))
