"""starpo vs TRL, side by side, on one tiny Llama and one data set: ``python -m benchmarks.run``.

Every configuration runs in its own child process (``benchmarks.worker``), so its peak
RSS is its own. The compared configurations (starpo vs TRL, ablations, row caps)
run in ``--rounds`` interleaved rounds (A B C …, A B C …), one fresh process
each time, and the report takes medians over the rounds: the machine is a shared VM
whose speed drifts by tens of percent over minutes, and interleaving makes a slow spell
hit every configuration alike. The parent builds the shared model/tokenizer/data once,
runs the children one after another (never two at once), and prints the tables, the
ratios last.
Results go to ``benchmarks/results/<UTC stamp>.json`` and ``latest.json`` (plus the same
tables as Markdown in ``latest.md``); ``--quick`` and ``--only`` runs write
``latest-quick.*`` / ``latest-partial.*`` instead, so ``latest.*`` is always a full run.

    python -m benchmarks.run            # full run (~15 min on 2 idle cores)
    python -m benchmarks.run --quick    # smaller data, 1 repetition (~2-3 min)
    python -m benchmarks.run --only dpo,sft --rounds 5
    python -m benchmarks.run --no-trl   # starpo only (TRL not installed)

Suites: peak (matmul), sft, sft_ablation, dpo, dpo_ablation, rowcap, profile (where the
time goes, torch.profiler), scale_data, scale_len.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

PROFILE_CATS = ["attention (sdpa fwd+bwd)", "matmul (linear layers + LM head)",
                "masks / indexing", "elementwise + other aten", "python / framework"]

TARGETS = {"dpo_speed": 2.0, "sft_speed": 1.3, "padding": 0.02}


@dataclass
class Sizes:
    sft_convs: int = 64
    sft_batch: int = 4
    sft_len: int = 1024
    dpo_pairs: int = 32
    dpo_batch: int = 8
    dpo_len: int = 2048
    lo: int = 10
    hi: int = 400
    rounds: int = 3        # round-robin repetitions of the compared configurations (medians)
    reps: int = 1          # repetitions inside each child process
    scale_reps: int = 1
    data_scale: int = 4
    len_his: tuple = (100, 1000)
    row_caps: tuple = (1024, 2048)
    free_caps: tuple = ()                # padding-free (no prefix sharing) with a row cap
    scale_data_frameworks: tuple = ("starpo", "trl")
    profiles: tuple = ("dpo:seg", "dpo:noseg", "sft:seg", "sft:noseg")


# microscopic sizes for the smoke test (``--tiny``): checks the plumbing, measures nothing
TINY = Sizes(sft_convs=8, sft_batch=2, sft_len=256, dpo_pairs=8, dpo_batch=4, dpo_len=512,
             lo=5, hi=40, rounds=1, data_scale=2, len_his=(20,), row_caps=(128,),
             profiles=("dpo:seg",))

QUICK = Sizes(sft_convs=40, dpo_pairs=16, rounds=1, data_scale=4, len_his=(100,),
              row_caps=(1024,))
# configurations of these suites run once per round, rounds interleaved (A B C, A B C, ...)
# so that a slow spell of the machine hits all of them alike; the others run once
ROUND_SUITES = ("sft", "sft_ablation", "dpo", "dpo_ablation", "rowcap")
QUICK_SUITES = ["peak", "sft", "dpo"]


@dataclass
class Config:
    name: str
    kind: str
    suite: str
    label: str
    cfg: dict = field(default_factory=dict)
    rounds: int = 1


# ----------------------------------------------------------------------------- planning

def plan(sz: Sizes, suites: set[str], trl: bool, data) -> list[Config]:
    out: list[Config] = []
    sft_data = data("sft", sz.sft_convs, sz.lo, sz.hi)
    pref = data("pref", sz.dpo_pairs, sz.lo, sz.hi)
    sft = dict(batch_size=sz.sft_batch, max_length=sz.sft_len, data=sft_data, reps=sz.reps)
    dpo = dict(batch_size=sz.dpo_batch, max_length=sz.dpo_len, data=pref, reps=sz.reps)

    def add(suite, name, kind, label, **cfg):
        if suite in suites and (trl or not kind.endswith("_trl")):
            rounds = sz.rounds if suite in ROUND_SUITES else 1
            out.append(Config(name, kind, suite, label, cfg, rounds))

    add("peak", "matmul", "matmul", "fp32 matmul 2048³", n=2048)
    add("sft", "sft_starpo", "sft_starpo",
        "starpo (BFD packing, segment attention, assistant-only loss)", **sft)
    add("sft", "sft_trl_bfd", "sft_trl", "TRL SFTTrainer packing='bfd' (padding-free)",
        packing_strategy="bfd", **sft)
    add("sft", "sft_trl_wrapped", "sft_trl", "TRL SFTTrainer packing='wrapped' (crosses documents)",
        packing_strategy="wrapped", **sft)
    add("sft_ablation", "sft_starpo_pad", "sft_starpo", "starpo, packing off (pad)", mode="pad", **sft)
    add("sft_ablation", "sft_starpo_noseg", "sft_starpo", "starpo, segment attention off "
        "(whole-row attention, rows padded to the longest)", segments=False, **sft)
    add("sft_ablation", "sft_starpo_plain", "sft_starpo", "starpo, chunked log-probs off",
        logprobs="plain", **sft)

    add("dpo", "dpo_starpo", "dpo_starpo",
        "starpo (padding-free + prefix sharing + ref cache + chunked + segment attention)",
        library=True, **dpo)
    add("dpo", "dpo_trl", "dpo_trl", "TRL DPOTrainer precompute_ref_log_probs=True", **dpo)

    add("dpo_ablation", "dpo_abl_free", "dpo_starpo", "prefix sharing off (padding-free docs)",
        layout="free", **dpo)
    add("dpo_ablation", "dpo_abl_padded", "dpo_starpo",
        "padding-free off (padded rows; no prefix sharing)", layout="padded", **dpo)
    add("dpo_ablation", "dpo_abl_inline", "dpo_starpo",
        "reference cache off (reference model forward in every step)", ref="inline", **dpo)
    add("dpo_ablation", "dpo_abl_plain", "dpo_starpo", "chunked log-probs off (full logits)",
        logprobs="plain", **dpo)
    add("dpo_ablation", "dpo_abl_noseg", "dpo_starpo",
        "segment attention off (whole-row attention)", segments=False, **dpo)

    for cap in sz.row_caps:
        add("rowcap", f"dpo_prefix_cap{cap}", "dpo_starpo",
            f"prefix sharing, rows capped at {cap} tokens", row_cap=cap, **dpo)
    for cap in sz.free_caps:
        add("rowcap", f"dpo_free_cap{cap}", "dpo_starpo",
            f"padding-free docs, rows capped at {cap} tokens", layout="free", row_cap=cap, **dpo)

    for spec in sz.profiles:
        what, att = spec.split(":")
        add("profile", f"profile_{what}_{att}", "profile",
            f"starpo {what.upper()}, segment attention {'on' if att == 'seg' else 'off'}",
            **{**(dpo if what == "dpo" else sft), "what": what, "segments": att == "seg",
               "reps": 1})

    big = data("pref", sz.dpo_pairs * sz.data_scale, sz.lo, sz.hi)
    for fw in ("starpo", "trl"):
        extra = {"library": True} if fw == "starpo" else {}
        kind = "dpo_trl" if fw == "trl" else "dpo_starpo"
        if fw in sz.scale_data_frameworks:
            add("scale_data", f"dpo_{fw}_x{sz.data_scale}", kind,
                f"{sz.data_scale}× pairs ({sz.dpo_pairs * sz.data_scale})",
                **{**dpo, "data": big, "reps": sz.scale_reps, **extra})
        for hi in sz.len_his:
            add("scale_len", f"dpo_{fw}_len{hi}", kind, f"lengths {sz.lo}–{hi}",
                **{**dpo, "data": data("pref", sz.dpo_pairs, sz.lo, hi),
                   "reps": sz.scale_reps, **extra})
    return out


# ----------------------------------------------------------------------------- running

def data_maker(work: Path):
    """``data(kind, n, lo, hi) -> path`` of a JSON file of rows (written once)."""
    from benchmarks import assets

    def data(kind: str, n: int, lo: int, hi: int) -> str:
        p = work / "data" / f"{kind}-{n}-{lo}-{hi}.json"
        if not p.is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            rows = (assets.sft_rows if kind == "sft" else assets.preference_rows)(n, lo=lo, hi=hi)
            p.write_text(json.dumps(rows))
        return str(p)
    return data


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                             "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
        info["avx512"] = "avx512f" in lscpu
        info["avx2"] = " avx2 " in f" {lscpu} "
    except OSError:
        pass
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__)
        import trl
        info["trl"] = trl.__version__
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        info["src_dirty"] = bool(dirty)
    except OSError:
        pass
    return info


def run_child(c: Config, work: Path, common: dict, log, rnd: int = 0) -> dict | None:
    cfg_path = work / "cfg" / f"{c.name}.json"
    out_path = work / "out" / f"{c.name}.r{rnd + 1}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)
    cfg_path.write_text(json.dumps({**common, **c.cfg, "name": c.name, "kind": c.kind}))
    load0 = os.getloadavg()
    busy0, ours0 = _busy_cpu_s(), _children_cpu_s()
    t = time.time()
    with open(work / "logs" / f"{c.name}.log", "w") as f:
        p = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(cfg_path),
                            str(out_path)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - t
    # CPU time used by every process on the machine minus our child's: other load
    foreign = max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - ours0)) / max(wall, 1e-9)
    if p.returncode != 0 or not out_path.is_file():
        log(f"  {c.name}: FAILED (exit {p.returncode}); see {work / 'logs' / (c.name + '.log')}")
        return None
    r = json.loads(out_path.read_text())
    r.update(suite=c.suite, label=c.label, child_wall_s=wall, load_before=load0[0],
             load_after=os.getloadavg()[0], other_cores_busy=foreign)
    return r


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def merge(rs: list[dict]) -> dict:
    """One configuration's rounds -> medians of the numbers (peak RSS included), the
    per-round values of the headline numbers, the worst other-process load seen."""
    if len(rs) == 1:
        return {**rs[0], "rounds": 1}
    out = {}
    for k, v in rs[0].items():
        if k.endswith("_reps"):
            out[k] = [x for r in rs for x in r[k]]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _median([r[k] for r in rs])
        else:
            out[k] = v
    for k in ("other_cores_busy", "load_before", "load_after"):
        out[k] = max(r[k] for r in rs)
    out["peak_rss_mib_rounds"] = [r["peak_rss_mib"] for r in rs]
    out["rounds"] = len(rs)
    return out


def _busy_cpu_s() -> float:
    """Seconds of non-idle CPU time summed over all cores since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = v[3] + (v[4] if len(v) > 4 else 0)           # idle + iowait
    busy = sum(v[:8]) - idle                            # user..steal, without guest double count
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------- reporting

def _f(x, nd=1):
    if x is None:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) + " |"  # noqa
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
                     + [line(r) for r in rows])


def verdict(value: float | None, target: float, higher: bool = True) -> str:
    if value is None:
        return "n/a"
    if (value >= target) if higher else (value <= target):
        return "met"
    if higher:
        return f"MISSED by {100 * (1 - value / target):.0f}% ({value:.2f}× of {target}×)"
    return f"MISSED by {100 * (value / target - 1):.0f}% over"


def report(res: dict[str, dict], meta: dict) -> tuple[str, dict]:
    g = res.get
    peak = g("matmul", {}).get("gflops_best")
    parts: list[str] = []
    ratios: dict = {}

    def share(r):
        return None if not (r and peak) else r["flops"] / (peak * 1e9)

    # SFT
    sft_rows = []
    for n in ("sft_starpo", "sft_trl_bfd", "sft_trl_wrapped", "sft_starpo_noseg",
              "sft_starpo_pad", "sft_starpo_plain"):
        r = g(n)
        if r:
            sft_rows.append([r["label"], _f(r["trainable_tokens_per_s"], 0),
                             _f(r["tokens_per_s"], 0), _f(r["peak_rss_mib"], 0),
                             _f(r["rss_after_load_mib"], 0),
                             f"{100 * r['padding_fraction']:.1f}%", int(r["steps"]),
                             _f(r["steady_s"]), _f(100 * share(r) if share(r) else None)])
    if sft_rows:
        parts.append("SFT (trainable = assistant tokens; medians over rounds)\n" + _table(
            ["configuration", "trainable tok/s", "all tok/s", "peak RSS MiB",
             "RSS after load", "padding", "steps", "timed s", "% of matmul peak"], sft_rows))

    # DPO main + ablations + row caps
    dpo_rows = []
    for n in ["dpo_starpo", "dpo_trl", "dpo_abl_free", "dpo_abl_padded", "dpo_abl_inline",
              "dpo_abl_plain", "dpo_abl_noseg"] + sorted(k for k in res if k.startswith(("dpo_prefix_cap",
                                                                         "dpo_free_cap"))):
        r = g(n)
        if r:
            base = g("dpo_starpo")
            rel = r["pairs_per_s"] / base["pairs_per_s"] if base else None
            dpo_rows.append([r["label"], _f(r["pairs_per_s"], 2), _f(r["train_pairs_per_s"], 2),
                             _f(r["ref_s"]), _f(r["peak_rss_mib"], 0),
                             _f(r["rss_after_load_mib"], 0),
                             f"{100 * r['padding_fraction']:.1f}%",
                             _f(r.get("row_len_max")), _f(rel, 2),
                             _f(100 * share(r) if share(r) else None)])
    if dpo_rows:
        parts.append("DPO (pairs/s include the reference pass, amortised over 1 epoch; "
                     "'vs starpo' = pairs/s relative to starpo's default)\n" + _table(
                         ["configuration", "pairs/s", "train-only pairs/s", "ref pass s",
                          "peak RSS MiB", "RSS after load", "padding", "longest row",
                          "vs starpo",
                          "% of matmul peak"], dpo_rows))

    # scaling
    sc_rows = []
    n1 = g("dpo_starpo", {}).get("pairs")
    for fw in ("starpo", "trl"):
        keys = [f"dpo_{fw}"] + sorted(k for k in res if k.startswith(f"dpo_{fw}_x")) + \
            sorted((k for k in res if k.startswith(f"dpo_{fw}_len")),
                   key=lambda k: int(k.rsplit("len", 1)[1]))
        for k in keys:
            r = g(k)
            if r:
                sc_rows.append([fw,
                                r["label"] if k != f"dpo_{fw}" else f"base ({n1} pairs, "
                                f"lengths {meta['sizes']['lo']}–{meta['sizes']['hi']})",
                                int(r["pairs"]), _f(r["e2e_s"]), _f(1000 / r["pairs_per_s"], 0),
                                _f(r["pairs_per_s"], 2), _f(r["tokens_real"] / r["pairs"], 0),
                                _f(r["peak_rss_mib"], 0)])
    if sc_rows:
        parts.append("DPO cost vs data size and sequence length\n" + _table(
            ["framework", "data", "pairs", "ref+train s", "ms/pair", "pairs/s",
             "tokens/pair computed", "peak RSS MiB"], sc_rows))

    # profiles
    prof_rows = []
    for k in sorted(x for x in res if x.startswith("profile_")):
        r = res[k]
        cats = r.get("categories", {})
        prof_rows.append([r["label"], " ".join("×".join(map(str, sh)) for sh in r["shapes"])] +
                         [f"{100 * cats.get(c, 0):.0f}%" for c in PROFILE_CATS])
    if prof_rows:
        parts.append("Where starpo's time goes (torch.profiler, self CPU time of forward+backward)\n"
                     + _table(["profile", "batch shapes"] + PROFILE_CATS, prof_rows))

    # ratios (last)
    rat = []
    s, tb, tw = g("sft_starpo"), g("sft_trl_bfd"), g("sft_trl_wrapped")
    trl_sft = [t for t in (tb, tw) if t]
    if s and trl_sft:
        best = max(trl_sft, key=lambda t: t["trainable_tokens_per_s"])
        v = s["trainable_tokens_per_s"] / best["trainable_tokens_per_s"]
        ratios["sft_tokens_per_s"] = v
        rat.append(["SFT trainable tokens/s", f"TRL best = {best['packing_strategy']}",
                    f"{v:.2f}×", f"≥ {TARGETS['sft_speed']}×", verdict(v, TARGETS["sft_speed"])])
        if tb and best is not tb:
            v2 = s["trainable_tokens_per_s"] / tb["trainable_tokens_per_s"]
            ratios["sft_tokens_per_s_vs_bfd"] = v2
            rat.append(["SFT trainable tokens/s", "TRL bfd (document-isolated)", f"{v2:.2f}×",
                        f"≥ {TARGETS['sft_speed']}×", verdict(v2, TARGETS["sft_speed"])])
        m = s["peak_rss_mib"] / min(t["peak_rss_mib"] for t in trl_sft)
        ratios["sft_peak_rss"] = m
        rat.append(["SFT peak RSS (starpo/TRL, < 1 better)", "lowest TRL", f"{m:.2f}×", "≤ 1×",
                    verdict(m, 1.0, higher=False)])
    if s:
        rat.append(["SFT padding fraction, starpo", "", f"{100 * s['padding_fraction']:.2f}%",
                    "< 2%", verdict(s["padding_fraction"], TARGETS["padding"], higher=False)])
    for t in trl_sft:
        rat.append([f"SFT padding fraction, TRL {t['packing_strategy']}", "",
                    f"{100 * t['padding_fraction']:.2f}%", "(info)", ""])
    d, t = g("dpo_starpo"), g("dpo_trl")
    if d and t:
        v = d["pairs_per_s"] / t["pairs_per_s"]
        ratios["dpo_pairs_per_s"] = v
        rat.append(["DPO pairs/s incl. reference pass", "TRL precompute_ref_log_probs",
                    f"{v:.2f}×", f"≥ {TARGETS['dpo_speed']}×", verdict(v, TARGETS["dpo_speed"])])
        v2 = d["train_pairs_per_s"] / t["train_pairs_per_s"]
        ratios["dpo_train_pairs_per_s"] = v2
        rat.append(["DPO pairs/s, training steps only", "", f"{v2:.2f}×", "(info)", ""])
        v3 = (t["ref_s"] / t["pairs"]) / (d["ref_s"] / d["pairs"])
        ratios["dpo_ref_pass"] = v3
        rat.append(["DPO reference pass speed", "", f"{v3:.2f}×", "(info)", ""])
        m = d["peak_rss_mib"] / t["peak_rss_mib"]
        ratios["dpo_peak_rss"] = m
        rat.append(["DPO peak RSS (starpo/TRL, < 1 better)", "", f"{m:.2f}×", "≤ 1×",
                    verdict(m, 1.0, higher=False)])
        for k in sorted(res):
            if k.startswith("dpo_starpo_") and k.replace("starpo", "trl") in res:
                a, b = res[k], res[k.replace("starpo", "trl")]
                suffix = k[len('dpo_starpo_'):]
                v = a["pairs_per_s"] / b["pairs_per_s"]
                ratios[f"dpo_pairs_per_s_{suffix}"] = v
                rat.append([f"DPO pairs/s, {a['label']}", "", f"{v:.2f}×",
                            f"≥ {TARGETS['dpo_speed']}×", verdict(v, TARGETS["dpo_speed"])])
                m = a["peak_rss_mib"] / b["peak_rss_mib"]
                ratios[f"dpo_peak_rss_{suffix}"] = m
                rat.append([f"DPO peak RSS, {a['label']} (< 1 better)", "", f"{m:.2f}×", "≤ 1×",
                            verdict(m, 1.0, higher=False)])
    inl = g("dpo_abl_inline")
    if inl and d:
        # what the reference cache buys, from the measured parts: the cached run pays
        # the reference pass once per data set; the in-step reference pays it every epoch
        tr, rf, per = 1 / d["train_pairs_per_s"], d["ref_s"] / d["pairs"], 1 / inl["pairs_per_s"]
        for what, ref_share in (("1 epoch (measured)", 1.0), ("2 epochs (derived)", 0.5),
                            ("cache hit: rerun / resume / sweep trial (derived)", 0.0)):
            v = per / (tr + rf * ref_share)
            ratios[f"ref_cache_{what.split()[0]}"] = v
            rat.append([f"DPO reference cache speed-up, {what}", "vs reference model in "
                        "every step", f"{v:.2f}×", "(info)", ""])
    if d:
        rat.append(["DPO padding fraction, starpo", "", f"{100 * d['padding_fraction']:.2f}%",
                    "< 2%", verdict(d["padding_fraction"], TARGETS["padding"], higher=False)])
    if t:
        rat.append(["DPO padding fraction, TRL", "", f"{100 * t['padding_fraction']:.2f}%",
                    "(info)", ""])
    for name, r in (("SFT", s), ("DPO", d)):
        if r and peak:
            ratios[f"{name.lower()}_flops_share"] = share(r)
            rat.append([f"{name} achieved FLOP/s / matmul peak (starpo)",
                        f"{r['flops'] / 1e9:.1f} / {peak:.1f} GFLOP/s",
                        f"{100 * share(r):.1f}%", "(info)", ""])
    if rat:
        parts.append("Ratios starpo / TRL (> 1 is better for throughput), measured in this run\n"
                     + _table(["metric", "against", "value", "target", "verdict"], rat))
    return "\n\n".join(parts), ratios


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small data, 1 repetition (~2-3 min)")
    ap.add_argument("--rounds", "--reps", type=int, dest="rounds",
                    help="round-robin repetitions of the compared configurations (median)")
    ap.add_argument("--only", help="comma-separated suites: peak,sft,sft_ablation,dpo,"
                                   "dpo_ablation,rowcap,scale_data,scale_len")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (also automatic if absent)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every child (default: all cores)")
    ap.add_argument("--work", default=os.environ.get("STARPO_BENCH_WORK", "/tmp/starpo-bench"),
                    help="scratch directory (model, data, per-config logs)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for the JSON results")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test sizes
    ap.add_argument("--report", metavar="RUNS_JSON",
                    help="do not run anything: rebuild the report from a saved "
                         "<work>/runs.json (written after every child)")
    args = ap.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        finish(saved["meta"], saved["runs"], Path(args.out), "latest-report", stamp=False)
        return 0

    sz = QUICK if args.quick else Sizes()
    if args.tiny:
        sz = TINY
    if args.rounds:
        sz.rounds = args.rounds
    all_suites = ["peak", "sft", "sft_ablation", "dpo", "dpo_ablation", "rowcap",
                  "profile", "scale_data", "scale_len"]
    suites = set(args.only.split(",")) if args.only else set(
        QUICK_SUITES if args.quick else all_suites)
    unknown = suites - set(all_suites)
    if unknown:
        ap.error(f"unknown suites {sorted(unknown)}; choose from {all_suites}")
    trl = not args.no_trl
    if trl:
        try:
            import trl as _  # noqa: F401
        except ImportError:
            print("TRL is not installed (pip install -e '.[bench]'): running starpo only")
            trl = False
    threads = args.threads or os.cpu_count() or 1

    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"building the shared model and tokenizer in {work} ...")
    sys.path.insert(0, str(ROOT))
    from benchmarks import assets
    model_dir = assets.build_assets(work)

    configs = plan(sz, suites, trl, data_maker(work))
    common = {"threads": threads, "model": str(model_dir)}
    load_start = os.getloadavg()
    meta = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "threads": threads, "sizes": sz.__dict__ | {
                "len_his": list(sz.len_his), "row_caps": list(sz.row_caps)},
            "quick": args.quick, "load_avg_start": load_start, "model": assets.MODEL,
            "command": " ".join(["python -m benchmarks.run"] + (argv if argv is not None
                                                                 else sys.argv[1:]))}
    if load_start[0] > 0.5 * threads:
        log(f"warning: load average {load_start[0]:.1f} on {os.cpu_count()} cores: other "
            f"processes are running, timings will be noisy")
    first = [c for c in configs if c.suite == "peak"]
    rounds = [(k, c) for k in range(max([c.rounds for c in configs] + [1]))
              for c in configs if c.suite != "peak" and c.rounds > 1 and k < c.rounds]
    rest = [c for c in configs if c.suite != "peak" and c.rounds <= 1]
    order = [(0, c) for c in first] + rounds + [(0, c) for c in rest]
    log(f"{len(configs)} configurations, {len(order)} child processes ({sz.rounds} rounds of "
        f"the compared ones), {threads} threads")
    runs: dict[str, list[dict]] = {}
    t0 = time.time()
    for i, (k, c) in enumerate(order, 1):
        r = run_child(c, work, common, log, k)
        if r is None:
            continue
        runs.setdefault(c.name, []).append(r)
        (work / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs}))
        key = next((x for x in ("pairs_per_s", "trainable_tokens_per_s", "gflops_best",
                                "profiled_s") if x in r), None)
        val = r[key]
        val = f"{val:.2f}" if isinstance(val, float) else json.dumps(val)
        log(f"[{i}/{len(order)}] {c.name:<22}{f' r{k + 1}' if c.rounds > 1 else '   '} {key}={val}"
            f"  peak RSS {r['peak_rss_mib']:.0f} MiB  ({r['child_wall_s']:.0f} s, other "
            f"processes {r['other_cores_busy']:.2f} cores)")
    meta.update(finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                wall_s=time.time() - t0, load_avg_end=os.getloadavg())
    (work / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    kind = "tiny" if args.tiny else ("latest-quick" if args.quick else
                                     ("latest" if not args.only else "latest-partial"))
    res = finish(meta, runs, Path(args.out), kind, stamp=not args.tiny)
    return 0 if res else 1


def finish(meta: dict, runs: dict[str, list[dict]], out: Path, kind: str, *,
           stamp: bool = True) -> dict:
    """Merge the rounds, print the tables (ratios last), write JSON and Markdown."""
    res = {name: merge(rs) for name, rs in runs.items()}
    text, ratios = report(res, meta)
    meta["load_avg_max_seen"] = max([r["load_before"] for r in res.values()] +
                                    [r["load_after"] for r in res.values()] + [0.0])
    other = [r["other_cores_busy"] for r in res.values()]
    meta["other_cores_busy_mean"] = sum(other) / max(1, len(other))
    meta["other_cores_busy_max"] = max(other + [0.0])
    load_start, threads = meta["load_avg_start"], meta["threads"]
    header = (f"machine: {meta['machine'].get('Model name', '?')}, "
              f"{meta['machine'].get('cpus')} cores, {threads} torch threads; load average "
              f"{load_start[0]:.2f} before the run (our own children push it to ~{threads} "
              f"while they run); CPU used by other processes during the run: mean "
              f"{meta['other_cores_busy_mean']:.2f}, max {meta['other_cores_busy_max']:.2f} "
              f"cores (per configuration); total {meta.get('wall_s', 0):.0f} s")
    print()
    print(header)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "ratios": ratios, "results": res}
    if stamp:
        when = meta.get("started", "").replace("-", "").replace(":", "").replace("+0000", "Z")
        (out / f"{when or 'run'}{'-quick' if meta.get('quick') else ''}.json").write_text(
            json.dumps(payload, indent=1))
    (out / f"{kind}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{kind}.md").write_text(
        f"{header}\n\ncommand: `{meta['command']}`\n\n```\n{text}\n```\n")
    return res


if __name__ == "__main__":
    sys.exit(main())
