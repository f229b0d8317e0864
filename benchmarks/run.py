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
    python -m benchmarks.run --only pipeline   # the quickstart, stage by stage
    python -m benchmarks.run --real     # SmolLM2-135M-Instruct on real HH-RLHF rows (SFT, DPO)

Suites: peak (matmul), sft, sft_ablation, dpo, dpo_ablation, rowcap, compile
(``train.compile: true`` against eager, with its compile time), profile (where the time
goes, torch.profiler, eager and compiled), scale_data, scale_len, pipeline (the quickstart
recipe run once as shipped and once with ``train.compile: true`` on every training stage:
seconds per stage, sampling and judging throughput).

TRL runs with ``gradient_checkpointing`` set explicitly (TRL 1.x defaults it to True), both
ways for the SFT and DPO suites; speed ratios compare with TRL's fastest setting and memory
ratios with its leanest, and the settings and library versions are printed and saved.
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
                "fused kernels (inductor)", "elementwise + other aten",
                "optimizer (AdamW, clipping)", "masks / indexing", "python / framework"]

# the quickstart recipe, as the README runs it (the pipeline suite)
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def training_stages(recipe: Path) -> list[str]:
    """The names of the recipe's stages that train (those with a ``train`` section)."""
    from starpo.recipe import load_recipe
    return [s.name for s in load_recipe(recipe).stages if getattr(s, "train", None) is not None]


# a quickstart shrunk to seconds (the smoke test's pipeline suite: plumbing only)
TINY_PIPELINE = [
    "model.tiny.hidden_size=32", "model.tiny.num_hidden_layers=1",
    "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=2",
    "model.tiny.intermediate_size=64",
    "stages.sft.data.sources.0.n=40", "stages.sft.train.max_steps=2",
    "stages.sft.train.save_every=null",
    "stages.dpo.data.sources.0.n=24", "stages.dpo.train.max_steps=1",
    "stages.dpo.train.batch_size=8", "stages.dpo.train.save_every=null",
    "stages.online.rounds=1", "stages.online.prompts_per_round=4", "stages.online.n_samples=2",
    "stages.online.generation.max_new_tokens=8", "stages.online.train.batch_size=4",
    "stages.eval.data.sources.0.n=4", "stages.eval.generation.max_new_tokens=8",
    "stages.eval.bootstrap=10"]

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
    profiles: tuple = ("dpo:seg", "dpo:noseg", "sft:seg", "sft:noseg", "dpo:seg:compile",
                       "sft:seg:compile")
    pipeline_overrides: tuple = ()       # applied to recipes/quickstart.yaml (none: as shipped)
    pipeline_compile: bool = True        # also the quickstart with train.compile: true


# microscopic sizes for the smoke test (``--tiny``): checks the plumbing, measures nothing
TINY = Sizes(sft_convs=8, sft_batch=2, sft_len=256, dpo_pairs=8, dpo_batch=4, dpo_len=512,
             lo=5, hi=40, rounds=1, data_scale=2, len_his=(20,), row_caps=(128,),
             profiles=("dpo:seg", "sft:seg:compile"), pipeline_overrides=tuple(TINY_PIPELINE),
             pipeline_compile=False)

# the real model (``--real``): SmolLM2-135M-Instruct (``starpo fetch``) on real HH-RLHF
# harmless-base rows, starpo against TRL's fastest setting only (one configuration each)
REAL = Sizes(sft_convs=24, sft_batch=2, sft_len=512, dpo_pairs=16, dpo_batch=4, dpo_len=256,
             rounds=1)
REAL_CONFIGS = ("sft_starpo", "sft_trl_bfd", "dpo_starpo", "dpo_trl")
HH = ROOT / "recipes" / "real" / "data" / "hh-harmless-base"

QUICK = Sizes(sft_convs=40, dpo_pairs=16, rounds=1, data_scale=4, len_his=(100,),
              row_caps=(1024,))
# configurations of these suites run once per round, rounds interleaved (A B C, A B C, ...)
# so that a slow spell of the machine hits all of them alike; the others run once
ROUND_SUITES = ("sft", "sft_ablation", "dpo", "dpo_ablation", "rowcap", "compile")
QUICK_SUITES = ["peak", "sft", "dpo", "compile"]
ALL_SUITES = ["peak", "sft", "sft_ablation", "dpo", "dpo_ablation", "rowcap", "compile",
              "profile", "scale_data", "scale_len", "pipeline"]


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
    # TRL 1.x defaults to gradient_checkpointing=True: every TRL setting runs both ways
    for gc in (False, True):
        sfx, txt = ("_gc", ", gradient checkpointing on") if gc else ("", "")
        add("sft", f"sft_trl_bfd{sfx}", "sft_trl",
            f"TRL SFTTrainer packing='bfd' (padding-free){txt}",
            packing_strategy="bfd", gradient_checkpointing=gc, **sft)
        add("sft", f"sft_trl_wrapped{sfx}", "sft_trl",
            f"TRL SFTTrainer packing='wrapped' (crosses documents){txt}",
            packing_strategy="wrapped", gradient_checkpointing=gc, **sft)
    add("compile", "sft_starpo_compile", "sft_starpo",
        "starpo, train.compile: true (regional, inductor)", compile=True, **sft)
    add("sft_ablation", "sft_starpo_pad", "sft_starpo", "starpo, packing off (pad)", mode="pad", **sft)
    add("sft_ablation", "sft_starpo_noseg", "sft_starpo", "starpo, segment attention off "
        "(whole-row attention, rows padded to the longest)", segments=False, **sft)
    add("sft_ablation", "sft_starpo_plain", "sft_starpo", "starpo, chunked log-probs off",
        logprobs="plain", **sft)

    add("dpo", "dpo_starpo", "dpo_starpo",
        "starpo (padding-free + prefix sharing + ref cache + chunked + segment attention)",
        library=True, **dpo)
    add("dpo", "dpo_trl", "dpo_trl", "TRL DPOTrainer precompute_ref_log_probs=True",
        gradient_checkpointing=False, **dpo)
    add("dpo", "dpo_trl_gc", "dpo_trl", "TRL DPOTrainer precompute_ref_log_probs=True, "
        "gradient checkpointing on", gradient_checkpointing=True, **dpo)
    add("compile", "dpo_starpo_compile", "dpo_starpo",
        "starpo, train.compile: true (regional, inductor; loop and reference pass)",
        library=True, compile=True, **dpo)

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
        what, att, *comp = spec.split(":")
        c = bool(comp and comp[0] == "compile")
        add("profile", f"profile_{what}_{att}{'_compile' if c else ''}", "profile",
            f"starpo {what.upper()}, segment attention {'on' if att == 'seg' else 'off'}"
            f"{', compiled' if c else ''}",
            **{**(dpo if what == "dpo" else sft), "what": what, "segments": att == "seg",
               "compile": c, "reps": 1})

    ov = list(sz.pipeline_overrides)
    add("pipeline", "pipeline", "pipeline", "quickstart (recipes/quickstart.yaml)",
        recipe=str(QUICKSTART), overrides=ov, reps=1)
    if sz.pipeline_compile:
        add("pipeline", "pipeline_compile", "pipeline", "quickstart, train.compile: true",
            recipe=str(QUICKSTART), compile=True, reps=1,
            overrides=ov + [f"stages.{st}.train.compile=true"
                                 for st in training_stages(QUICKSTART)])

    big = data("pref", sz.dpo_pairs * sz.data_scale, sz.lo, sz.hi)
    for fw in ("starpo", "trl"):
        extra = {"library": True} if fw == "starpo" else {"gradient_checkpointing": False}
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


def real_data_maker(work: Path, model_dir: Path, sz: Sizes):
    """``data(kind, n, lo, hi) -> path`` of real HH-RLHF rows (the first ``n`` of the
    training file, in file order, that fit without truncation: SFT conversations within
    ``sft_len`` tokens, pairs within ``dpo_len`` with the prompt within half of it), in the
    benchmark's row shapes; ``lo``/``hi`` are ignored. SFT rows keep every assistant turn
    trained (TRL's ``assistant_only_loss`` cannot leave earlier answers out)."""
    from transformers import AutoTokenizer

    from starpo.data.sources import load_source
    from starpo.data.tokenize import PairStats, tokenize_conversation, tokenize_pair
    from starpo.model.loading import CHATML_TEMPLATE
    from starpo.recipe import SourceSpec

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = CHATML_TEMPLATE   # as the worker sets it (TRL needs the markers)

    def data(kind: str, n: int, lo: int, hi: int) -> str:
        p = work / "data" / f"hh-{kind}-{n}-{sz.sft_len}-{sz.dpo_len}.json"
        if p.is_file():
            return str(p)
        sft = kind == "sft"
        spec = SourceSpec(path=str(HH), split="train", **({"use": "chosen"} if sft else {}))
        rows = []
        for r in load_source(spec, "sft" if sft else "preference", on_bad_rows="skip"):
            if sft:
                if len(tokenize_conversation(tok, r["messages"]).input_ids) <= sz.sft_len:
                    rows.append({"messages": r["messages"]})
            else:
                st = PairStats()
                t = tokenize_pair(tok, r, max_length=sz.dpo_len,
                                  max_prompt_length=sz.dpo_len // 2, stats=st)
                if t is not None and not st.truncated:
                    rows.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
            if len(rows) == n:
                break
        p.parent.mkdir(parents=True, exist_ok=True)
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
    for lib in ("torch", "transformers", "trl", "accelerate"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
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
    line = lambda r: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) + " |"
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


def _trl_name(r: dict) -> str:
    st = r.get("trl_settings", {})
    what = f"packing={r['packing_strategy']}, " if "packing_strategy" in r else ""
    return f"{what}gradient_checkpointing={st.get('gradient_checkpointing')}"


def report(res: dict[str, dict], meta: dict) -> tuple[str, dict]:
    g = res.get
    peak = g("matmul", {}).get("gflops_best")
    parts: list[str] = []
    ratios: dict = {}

    def share(r):
        return None if not (r and peak) else r["flops"] / (peak * 1e9)

    # SFT
    sft_rows = []
    for n in ("sft_starpo", "sft_starpo_compile", "sft_trl_bfd", "sft_trl_wrapped",
              "sft_trl_bfd_gc", "sft_trl_wrapped_gc", "sft_starpo_noseg", "sft_starpo_pad",
              "sft_starpo_plain"):
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
    for n in ["dpo_starpo", "dpo_starpo_compile", "dpo_trl", "dpo_trl_gc", "dpo_abl_free",
              "dpo_abl_padded", "dpo_abl_inline",
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

    # compile
    comp_rows = []
    for what, e_name, c_name in (("SFT", "sft_starpo", "sft_starpo_compile"),
                                 ("DPO", "dpo_starpo", "dpo_starpo_compile")):
        e, c = g(e_name), g(c_name)
        if not (e and c):
            continue
        cs = c.get("compile_stats") or {}
        over = c["first_step_s"] - e["first_step_s"] + c.get("ref_s", 0) - e.get("ref_s", 0)
        gain = e["step_median_s"] - c["step_median_s"]
        be = over / gain if gain > 0 else None
        ratios[f"{what.lower()}_compile_step_speedup"] = e["step_median_s"] / c["step_median_s"]
        ratios[f"{what.lower()}_compile_overhead_s"] = over
        comp_rows.append([what, f"{_f(e['first_step_s'], 2)} → {_f(c['first_step_s'], 2)}",
                          f"{_f(e.get('ref_s'), 2)} → {_f(c.get('ref_s'), 2)}",
                          f"{_f(e['step_median_s'], 3)} → {_f(c['step_median_s'], 3)}",
                          f"{e['step_median_s'] / c['step_median_s']:.2f}×", _f(over),
                          _f(be, 0) if be is not None else "never",
                          cs.get("graphs", "–"), cs.get("graph_breaks", "–")])
    if comp_rows:
        parts.append("train.compile (regional torch.compile, cold inductor cache; eager → "
                     "compiled; overhead = extra first-step + reference-pass seconds; "
                     "break-even = overhead / seconds saved per step)\n" + _table(
                         ["stage", "first step s", "ref pass s", "median step s",
                          "step speed-up", "compile overhead s", "break-even steps",
                          "graphs compiled", "graph breaks"], comp_rows))

    # profiles
    prof_rows = []
    for k in sorted(x for x in res if x.startswith("profile_")):
        r = res[k]
        cats = r.get("categories", {})
        mm = (r["mm_flops"] / r["mm_s"] / (peak * 1e9)) if (peak and r.get("mm_s")) else None
        prof_rows.append([r["label"], " ".join("×".join(map(str, sh)) for sh in r["shapes"]),
                          _f(r.get("steps_s"), 2),
                          _f(100 * r["flops"] / (peak * 1e9) if peak and "flops" in r else None),
                          _f(100 * mm if mm else None)] +
                         [f"{100 * cats.get(c, 0):.0f}%" for c in PROFILE_CATS])
    if prof_rows:
        parts.append("Where starpo's time goes (torch.profiler, self CPU time of whole training "
                     "steps: forward, backward, clipping, AdamW; '% of peak' = model FLOPs of "
                     "the steps timed without the profiler / matmul peak; 'matmul ops' = the "
                     "profiler's FLOPs of the matmul operators / their own time / peak)\n"
                     + _table(["profile", "batch shapes", "steps s", "% of peak",
                               "matmul ops % of peak"] + PROFILE_CATS, prof_rows))

    # the quickstart, stage by stage
    pe, pc_ = g("pipeline"), g("pipeline_compile")
    if pe:
        cst = {x["stage"]: x for x in (pc_ or {}).get("stages", [])}
        pipe_rows = []
        for x in pe["stages"]:
            y = cst.get(x["stage"], {})
            pipe_rows.append([x["stage"], _f(x.get("seconds")),
                              _f(y.get("seconds")) if pc_ else "–", x.get("steps") or "–",
                              _f(x.get("train_tokens_per_s"), 0),
                              _f(x.get("sampling_s")), _f(x.get("sampling_tokens_per_s"), 0),
                              _f(x.get("judging_s")), _f(x.get("judging_per_s"), 0)])
        pipe_rows.append(["total (incl. setup)", _f(pe["total_s"]),
                          _f(pc_["total_s"]) if pc_ else "–", "", "", "", "", "", ""])
        parts.append("The quickstart stage by stage (one run each; train tok/s = median of the "
                     "loop's logged windows; sampling = generated tokens/s; judging = "
                     "responses scored/s)\n" + _table(
                         ["stage", "seconds", "seconds, train.compile", "steps",
                          "train tok/s", "sampling s", "gen tok/s", "judging s",
                          "judged/s"], pipe_rows))
        ratios["quickstart_s"] = pe["total_s"]
        if pc_:
            ratios["quickstart_compile_s"] = pc_["total_s"]

    # TRL settings
    trl_rows = [[k, ", ".join(f"{a}={b}" for a, b in res[k]["trl_settings"].items()
                              if b is not None)]
                for k in sorted(res) if res[k].get("trl_settings")]
    if trl_rows:
        parts.append("TRL settings used (from its config objects)\n" +
                     _table(["configuration", "settings"], trl_rows))

    # ratios (last)
    rat = []
    s = g("sft_starpo")
    trl_sft = [g(n) for n in ("sft_trl_bfd", "sft_trl_wrapped", "sft_trl_bfd_gc",
                              "sft_trl_wrapped_gc") if g(n)]
    bfd = [t for t in trl_sft if t["packing_strategy"] == "bfd"]
    if s and trl_sft:
        best = max(trl_sft, key=lambda t: t["trainable_tokens_per_s"])
        v = s["trainable_tokens_per_s"] / best["trainable_tokens_per_s"]
        ratios["sft_tokens_per_s"] = v
        ratios["sft_trl_fastest"] = best["name"]
        rat.append(["SFT trainable tokens/s", f"TRL fastest = {_trl_name(best)}",
                    f"{v:.2f}×", f"≥ {TARGETS['sft_speed']}×", verdict(v, TARGETS["sft_speed"])])
        if bfd and best not in bfd:
            b = max(bfd, key=lambda t: t["trainable_tokens_per_s"])
            v2 = s["trainable_tokens_per_s"] / b["trainable_tokens_per_s"]
            ratios["sft_tokens_per_s_vs_bfd"] = v2
            rat.append(["SFT trainable tokens/s", f"TRL fastest document-isolated = "
                        f"{_trl_name(b)}", f"{v2:.2f}×",
                        f"≥ {TARGETS['sft_speed']}×", verdict(v2, TARGETS["sft_speed"])])
        lean = min(trl_sft, key=lambda t: t["peak_rss_mib"])
        m = s["peak_rss_mib"] / lean["peak_rss_mib"]
        ratios["sft_peak_rss"] = m
        ratios["sft_trl_leanest"] = lean["name"]
        rat.append(["SFT peak RSS (starpo/TRL, < 1 better)", f"TRL leanest = {_trl_name(lean)}",
                    f"{m:.2f}×", "≤ 1×", verdict(m, 1.0, higher=False)])
    if s:
        rat.append(["SFT padding fraction, starpo", "", f"{100 * s['padding_fraction']:.2f}%",
                    "< 2%", verdict(s["padding_fraction"], TARGETS["padding"], higher=False)])
    for t in trl_sft:
        if not t.get("trl_settings", {}).get("gradient_checkpointing"):
            rat.append([f"SFT padding fraction, TRL {t['packing_strategy']}", "",
                        f"{100 * t['padding_fraction']:.2f}%", "(info)", ""])
    d = g("dpo_starpo")
    trl_dpo = [g(n) for n in ("dpo_trl", "dpo_trl_gc") if g(n)]
    t = max(trl_dpo, key=lambda x: x["pairs_per_s"]) if trl_dpo else None
    if d and t:
        v = d["pairs_per_s"] / t["pairs_per_s"]
        ratios["dpo_pairs_per_s"] = v
        ratios["dpo_trl_fastest"] = t["name"]
        rat.append(["DPO pairs/s incl. reference pass", f"TRL fastest = {_trl_name(t)}",
                    f"{v:.2f}×", f"≥ {TARGETS['dpo_speed']}×", verdict(v, TARGETS["dpo_speed"])])
        v2 = d["train_pairs_per_s"] / t["train_pairs_per_s"]
        ratios["dpo_train_pairs_per_s"] = v2
        rat.append(["DPO pairs/s, training steps only", "", f"{v2:.2f}×", "(info)", ""])
        v3 = (t["ref_s"] / t["pairs"]) / (d["ref_s"] / d["pairs"])
        ratios["dpo_ref_pass"] = v3
        rat.append(["DPO reference pass speed", "", f"{v3:.2f}×", "(info)", ""])
        lean = min(trl_dpo, key=lambda x: x["peak_rss_mib"])
        m = d["peak_rss_mib"] / lean["peak_rss_mib"]
        ratios["dpo_peak_rss"] = m
        ratios["dpo_trl_leanest"] = lean["name"]
        rat.append(["DPO peak RSS (starpo/TRL, < 1 better)", f"TRL leanest = {_trl_name(lean)}",
                    f"{m:.2f}×", "≤ 1×", verdict(m, 1.0, higher=False)])
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
    ap.add_argument("--only", help="comma-separated suites: " + ",".join(ALL_SUITES))
    ap.add_argument("--pipeline", action="store_true",
                    help="add the pipeline suite (the quickstart stage by stage, ~4 min) to "
                         "--quick or --only")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL (also automatic if absent)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every child (default: all cores)")
    ap.add_argument("--work", default=os.environ.get("STARPO_BENCH_WORK", "/tmp/starpo-bench"),
                    help="scratch directory (model, data, per-config logs)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for the JSON results")
    ap.add_argument("--real", action="store_true",
                    help="SmolLM2-135M-Instruct (fetched into ~/.cache/starpo) on real "
                         "HH-RLHF rows: SFT and DPO, starpo vs TRL's fastest setting")
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
    if args.real:
        sz = REAL
    if args.rounds:
        sz.rounds = args.rounds
    all_suites = ALL_SUITES
    suites = set(args.only.split(",")) if args.only else set(
        QUICK_SUITES if args.quick else all_suites)
    if args.real:
        suites &= {"sft", "dpo"}
    if args.pipeline:
        suites.add("pipeline")
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
    log = lambda msg: print(msg, flush=True)
    log(f"building the shared model and tokenizer in {work} ...")
    sys.path.insert(0, str(ROOT))
    from benchmarks import assets
    if args.real:
        from starpo.run.fetch import fetch
        model_dir = fetch("smollm2-135m-instruct", log=log)
        configs = [c for c in plan(sz, suites, trl, real_data_maker(work, model_dir, sz))
                   if c.name in REAL_CONFIGS]
    else:
        model_dir = assets.build_assets(work)
        configs = plan(sz, suites, trl, data_maker(work))
    common = {"threads": threads, "model": str(model_dir)}
    if args.real:
        common["chat_template"] = "chatml"
    load_start = os.getloadavg()
    meta = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "threads": threads, "sizes": sz.__dict__ | {
                "len_his": list(sz.len_his), "row_caps": list(sz.row_caps)},
            "quick": args.quick, "real": args.real, "load_avg_start": load_start,
            "model": f"SmolLM2-135M-Instruct ({model_dir})" if args.real else assets.MODEL,
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
                                "profiled_s", "total_s") if x in r), None)
        val = r[key]
        val = f"{val:.2f}" if isinstance(val, float) else json.dumps(val)
        log(f"[{i}/{len(order)}] {c.name:<22}{f' r{k + 1}' if c.rounds > 1 else '   '} {key}={val}"
            f"  peak RSS {r['peak_rss_mib']:.0f} MiB  ({r['child_wall_s']:.0f} s, other "
            f"processes {r['other_cores_busy']:.2f} cores)")
    meta.update(finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                wall_s=time.time() - t0, load_avg_end=os.getloadavg())
    (work / "runs.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    kind = "tiny" if args.tiny else "latest-real" if args.real else (
        "latest-quick" if args.quick else ("latest" if not args.only else "latest-partial"))
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
              f"cores (per configuration); total {meta.get('wall_s', 0):.0f} s\n"
              "versions: " + ", ".join(f"{k} {meta['machine'].get(k)}" for k in
                                       ("torch", "transformers", "trl", "accelerate")))
    print()
    print(header)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "ratios": ratios, "results": res}
    if stamp:
        when = meta.get("started", "").replace("-", "").replace(":", "").replace("+0000", "Z")
        sfx = "-quick" if meta.get("quick") else "-real" if meta.get("real") else ""
        (out / f"{when or 'run'}{sfx}.json").write_text(
            json.dumps(payload, indent=1))
    (out / f"{kind}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{kind}.md").write_text(
        f"{header}\n\ncommand: `{meta['command']}`\n\n```\n{text}\n```\n")
    return res


if __name__ == "__main__":
    sys.exit(main())
