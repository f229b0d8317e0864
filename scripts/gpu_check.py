"""The GPU check behind ``scripts/gpu_check.sh``: one command, under 8 minutes on one H200,
on the machine this project is lent (no registry, no flash-attn, no vLLM; see
BENCHMARKS.md, "GPU check").

Steps, in this order, each in its own process with its own time limit, all under one
deadline (a failing step is recorded and the next one still runs; a step with no time
left is skipped):

    install    --wheels DIR: pip installs every wheel of DIR into WORK/site (--no-index,
               --no-deps, --target; every later step runs with WORK/site and src/ on
               PYTHONPATH), then checks that starpo's and the bench's modules import
                                                                  → WORK/install.txt
    env        nvidia-smi; python, torch/CUDA, bf16, the attention kernels torch offers
               (varlen, flex), flash-attn and vLLM (present or not), library versions
                                                                  → WORK/env.txt
    model      two Llama-shaped checkpoints with random weights and the real GPT-2
               tokenizer (ChatML added by starpo): ~0.4B (Qwen2-0.5B's widths) and ~1.4B
               (Qwen2-1.5B's widths), for the bench's larger-work configuration
                                                                  → WORK/model, WORK/model-large
    gpu-tests  pytest -m gpu over the test files that have gpu tests → WORK/gpu-tests.{txt,xml}
    bench      scripts/gpu_bench.py: starpo (each packed-attention kernel the GPU offers)
               vs TRL (gradient checkpointing off and on), the larger-work SFT, HF-backend
               sampling; configurations in priority order under the step's limit
                                                                  → WORK/bench/
    pipeline   a shrunk copy of recipes/hitchhiker/phi-3-medium.yaml on the ~0.4B model:
               sft → dpo → reward → online → eval, with flash-attention 2 and vLLM where
               they are installed, else sdpa (starpo then keeps packed documents apart
               with torch's varlen kernel, or flex attention) and the HF generation backend
                                                                  → WORK/pipeline/
    table      the pipeline's training stages (tokens/s, MFU) and the bench's table
                                                                  → WORK/table.md

Then the results are packed into at most 8 files under ``--pack DIR`` (default WORK/pack):
table.md, steps.json, bench.json, env.txt, gpu-tests.txt, eval-summary.json and logs.tgz
(every text file under WORK, within 15 MiB) — no more come back from the lent machine.

``--dry-run`` checks the plan on any machine: the step limits fit the deadline, the shrunk
recipe validates, the tokenizer and data files are found, the wheels cover what the lent
machine lacks (one version each), the bench's configurations fit its step and their data
gives the steps they time; it writes WORK/plan.json. ``--cpu`` is the wiring check: every
step end to end on a CPU with tiny models and sizes (a few minutes), figures meaningless.

Data: ``shared/realdata`` inside the repository (how the lent machine receives it) or
beside it, or ``--realdata DIR`` / ``$STARPO_REALDATA``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARD_LIMIT_S = 480           # gpu_check.sh's `timeout`: the whole check, packing included
PACK_RESERVE_S = 15          # kept after the last step for the table and the packing
DATASHEET_BF16_FLOPS = 989e12
MEASURED_BF16_FLOPS = 790e12

# Llama shapes with GPT-2's vocabulary + ChatML: ~0.4B (Qwen2-0.5B's widths) and ~1.4B
# (Qwen2-1.5B's widths; head dim 128)
MODEL = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096,
         "tie_word_embeddings": True, "rope_theta": 1000000.0}
LARGE_MODEL = {**MODEL, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
               "num_attention_heads": 12, "num_key_value_heads": 2}
# --cpu: the same steps on shapes a CPU runs in seconds
CPU_MODEL = {**MODEL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
CPU_LARGE_MODEL = {**CPU_MODEL, "hidden_size": 96, "num_hidden_layers": 3}

# seconds per step on one H200 (together with PACK_RESERVE_S within HARD_LIMIT_S); --cpu
# has its own
LIMITS = {"install": 30, "env": 15, "model": 45, "gpu-tests": 60, "bench": 235,
          "pipeline": 80}
CPU_LIMITS = {"install": 120, "env": 60, "model": 120, "gpu-tests": 240, "bench": 900,
              "pipeline": 600}
STEPS = list(LIMITS)
# --cpu bench sizes: a few steps of tiny rows (gpu_bench.SIZES / LARGE_SIZES overrides)
CPU_BENCH_SIZES = {"sft_convs": 48, "sft_batch": 2, "sft_len": 256, "dpo_pairs": 12,
                   "dpo_batch": 2, "dpo_len": 256, "hi": 24, "steps": 4, "warm_steps": 1,
                   "online_prompts": 3, "online_n": 2, "eval_prompts": 4, "new_tokens": 8}
CPU_LARGE_SIZES = {"sft_convs": 64, "sft_batch": 2, "grad_accum": 2}

# The distributions the lent H200's image lacks or has too old (BENCHMARKS.md, "GPU
# check"): with --wheels, the dry run checks that DIR holds each of them
CARRIED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "typing-extensions", "transformers", "trl", "datasets", "dill", "multiprocess",
           "regex")
# the lent machine's Python and processor: the python tags and platforms a wheel may have
MACHINE_PYTHON_TAGS = {"py3", "py312", "cp312"}
MACHINE_PLATFORM = "x86_64"
# modules the steps import: starpo's (pipeline, tests, bench) and the bench's TRL side
NEEDED_MODULES = ("torch", "transformers", "tokenizers", "accelerate", "safetensors", "yaml",
                  "pydantic", "typer", "rich", "tqdm", "numpy", "datasets", "trl", "pytest")
PACK_FILES = ("table.md", "steps.json", "bench.json", "env.txt", "gpu-tests.txt",
              "eval-summary.json", "logs.tgz")
PACK_MAX_FILES = 8                  # what comes back from the lent machine
LOGS_MAX_BYTES = 15 * 2**20         # each file back is at most 16 MiB
TEXT_SUFFIXES = {".json", ".jsonl", ".txt", ".log", ".md", ".yaml", ".xml", ".html"}
# copies of the GPT-2 tokenizer in every checkpoint: megabytes each, nothing to read
TOKENIZER_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja"}


# --------------------------------------------------------------------------- the plan

def realdata_candidates(explicit: str | None = None) -> list[Path]:
    """Where the check looks for ``realdata`` (the GPT-2 tokenizer, PKU-SafeRLHF and
    HH-RLHF rows), in order: ``--realdata`` / ``$STARPO_REALDATA``; ``shared/realdata``
    inside the repository (the lent machine receives ``shared/`` inside the copy of the
    checkout); ``../shared/realdata`` beside it (the development machine's layout)."""
    given = explicit or os.environ.get("STARPO_REALDATA")
    return ([Path(given)] if given else []) + [ROOT / "shared" / "realdata",
                                                ROOT.parent / "shared" / "realdata"]


def find_realdata(explicit: str | None = None) -> Path:
    """The path given (``--realdata`` / ``$STARPO_REALDATA``), even if it is missing (the
    plan then says so), else the first of :func:`realdata_candidates` that exists (else the
    first one)."""
    cands = realdata_candidates(explicit)
    if explicit or os.environ.get("STARPO_REALDATA"):
        return cands[0]
    return next((c for c in cands if c.is_dir()), cands[0])


def data_files(realdata: Path) -> list[Path]:
    return [realdata / "tokenizers" / "gpt2" / "tokenizer.json",
            realdata / "pku_saferlhf.jsonl", realdata / "hh_rlhf.jsonl"]


def backends() -> dict:
    """The attention implementation and the generation backend the pipeline uses here:
    flash-attention 2 / vLLM when installed, else sdpa (starpo picks varlen or flex for
    packed rows on CUDA by itself) / the HF backend."""
    flash = importlib.util.find_spec("flash_attn") is not None
    vllm = importlib.util.find_spec("vllm") is not None
    return {"attn_implementation": "flash_attention_2" if flash else "sdpa",
            "generation_backend": "vllm" if vllm else "hf",
            "why": f"flash_attn {'installed' if flash else 'absent'}, "
                   f"vllm {'installed' if vllm else 'absent'}"}


def shrunk_recipe(model_dir: str, realdata: Path, *, cpu: bool = False,
                  chosen: dict | None = None) -> dict:
    """recipes/hitchhiker/phi-3-medium.yaml at smoke size on the check's model and local
    data, with the online stage the guide's recipe leaves out; attention and generation
    backend from :func:`backends`."""
    import yaml
    chosen = chosen or backends()
    r = yaml.safe_load((ROOT / "recipes" / "hitchhiker" / "phi-3-medium.yaml").read_text())
    pku, hh = str(realdata / "pku_saferlhf.jsonl"), str(realdata / "hh_rlhf.jsonl")
    backend = chosen["generation_backend"]
    r["name"] = "gpu-check"
    r["model"] = {"name_or_path": model_dir, "dtype": "auto",
                  "attn_implementation": chosen["attn_implementation"]}
    short = {"max_steps": 2 if cpu else 8, "batch_size": 8, "grad_accum": 1, "log_every": 2,
             "save_every": 100, "warmup_ratio": 0.1, "gradient_checkpointing": False}
    new_tokens = 8 if cpu else 64
    sft, dpo, ev = (r["stages"][i] for i in range(3))
    sft["data"]["sources"] = [{"path": pku, "use": "chosen"}, {"path": hh, "use": "chosen"},
                              {"path": "world:sft", "n": 200 if cpu else 2000}]
    sft["packing"]["max_length"] = 1024
    sft["train"].update(short, lr=1e-4)
    dpo["data"]["sources"] = [{"path": pku}, {"path": hh},
                              {"path": "world:preference", "n": 100 if cpu else 600}]
    dpo["max_length"], dpo["max_prompt_length"] = 512, 256
    dpo["train"].update(short, lr=1e-6)
    reward = {"type": "reward", "model": "sft", "max_length": 512, "max_prompt_length": 256,
              "data": dpo["data"], "train": {**short, "lr": 1e-5}}
    online = {"type": "online", "loss": "dpo", "beta": 0.1, "max_length": 512,
              "max_prompt_length": 256, "rounds": 1, "prompts_per_round": 4 if cpu else 16,
              "n_samples": 2 if cpu else 4,
              "generation": {"temperature": 0.8, "max_new_tokens": new_tokens,
                             "backend": backend},
              "judge": {"type": "reward_model", "path": "reward", "batch_size": 32},
              "data": {"sources": [{"path": "world:prompt", "n": 64}]},
              "train": {**short, "max_steps": 2, "batch_size": 4}}
    ev["data"]["sources"] = [{"path": hh, "n": 4 if cpu else 16},
                             {"path": "world:eval", "n": 4 if cpu else 16}]
    ev["judge"] = {"type": "reward_model", "path": "reward", "batch_size": 32}
    ev["generation"].update(max_new_tokens=new_tokens, backend=backend)
    ev["bootstrap"] = 200
    r["stages"] = [sft, dpo, reward, online, ev]
    return r


def gpu_test_files() -> list[str]:
    """The test files with ``gpu``-marked tests (pytest then collects only those)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-")


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels_report(wheels: str | None) -> dict:
    """What ``--wheels DIR`` holds: ``{"wheels": {dist: [versions]}, "problems": [...]}``;
    a problem is a missing directory, a distribution of :data:`CARRIED` it lacks, or two
    versions of one distribution (pip would refuse to install either)."""
    if not wheels:
        return {"dir": None, "wheels": {}, "problems": []}
    d = Path(wheels)
    if not d.is_dir():
        return {"dir": str(d), "wheels": {}, "problems": [f"--wheels {d}: no such directory"]}
    found: dict[str, list[str]] = {}
    problems = []
    for p in sorted(d.glob("*.whl")):
        m = _WHEEL.match(p.name)
        if m:
            found.setdefault(_dist(m["name"]), []).append(m["version"])
        tags = p.name[:-len(".whl")].split("-")[-3:]
        if len(tags) == 3 and (not set(tags[0].split(".")) & MACHINE_PYTHON_TAGS or
                               tags[2] != "any" and MACHINE_PLATFORM not in tags[2]):
            problems.append(f"--wheels {d}: {p.name} is not for the lent machine "
                            f"(Python 3.12 on {MACHINE_PLATFORM})")
    problems += [f"--wheels {d}: no wheel of {c} (the lent machine lacks it)"
                 for c in CARRIED if c not in found]
    problems += [f"--wheels {d}: {n} in {len(v)} versions ({', '.join(v)}); keep one"
                 for n, v in found.items() if len(v) > 1]
    return {"dir": str(d), "wheels": found, "problems": problems}


def limits_for(cpu: bool) -> dict:
    return dict(CPU_LIMITS if cpu else LIMITS)


def budget_for(cpu: bool) -> int:
    """The steps' deadline in seconds from the start."""
    return sum(CPU_LIMITS.values()) if cpu else HARD_LIMIT_S - PACK_RESERVE_S


def bench_args(work: Path, cpu: bool, limit: float, configs: str | None) -> list[str]:
    args = ["all", "--model", str(work / "model"), "--large", str(work / "model-large"),
            "--out", str(work / "bench"), "--budget", str(max(1, int(limit) - 5))]
    if configs:
        args += ["--configs", configs]
    if cpu:
        args += ["--sizes", json.dumps(CPU_BENCH_SIZES),
                 "--large-sizes", json.dumps(CPU_LARGE_SIZES), "--limit", "300"]
    return args


def _import_bench():
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT), str(ROOT / "src")]
    import gpu_bench
    return gpu_bench


def bench_plan(step_limit: float, configs: str | None, realdata: Path, *,
               cpu: bool = False) -> dict:
    """The bench step's configurations with their limits (``sure``: it gets its whole limit
    even if every one before it uses all of its own), its sizes, and whether the data gives
    every configuration its steps: micro-batches estimated from 200 tokenized rows."""
    gb = _import_bench()
    sizes = {**gb.SIZES, **(CPU_BENCH_SIZES if cpu else {})}
    large = {**gb.LARGE_SIZES, **(CPU_LARGE_SIZES if cpu else {})}
    cfgs = gb.select(configs)
    problems = []
    steps = {}
    tok = _tokenizer(realdata)
    per_conv: dict = {}
    for kind, sz in (("sft", sizes), ("sft-large", {**sizes, **large}), ("dpo", sizes)):
        need = sz["steps"] * sz["grad_accum"]
        if kind == "dpo":
            have = sz["dpo_pairs"] // sz["dpo_batch"]
        else:
            key = (sz["lo"], sz["hi"])
            per_row = per_conv[key] = per_conv.get(key) or _tokens_per_conv(tok, sz)
            have = int(sz["sft_convs"] * per_row / (sz["sft_len"] * 0.97) // sz["sft_batch"])
        steps[kind] = {"micro_batches_needed": need, "micro_batches_estimated": have,
                       "timed_steps": sz["steps"] - max(sz["warm_steps"], 1)}
        if have < need:
            problems.append(f"bench {kind}: ~{have} micro-batches for {need} needed "
                            f"({sz['steps']} steps × {sz['grad_accum']}); more rows")
        if not cpu and sz["steps"] - max(sz["warm_steps"], 1) < 30:
            problems.append(f"bench {kind}: fewer than 30 timed steps")
    return {"configs": gb.plan(cfgs, max(1, step_limit - 5)), "sizes": sizes,
            "large_sizes": large, "steps": steps, "problems": problems,
            "peak_flops": {"datasheet": gb.DATASHEET_BF16_FLOPS,
                           "measured": gb.MEASURED_BF16_FLOPS}}


def _tokenizer(realdata: Path):
    from starpo.model import loading
    from starpo.recipe import ModelSpec
    tok_dir = realdata / "tokenizers" / "gpt2"
    return loading.load_tokenizer(str(tok_dir), ModelSpec(name_or_path=str(tok_dir)))


def _tokens_per_conv(tok, sizes: dict, n: int = 200) -> float:
    """Mean tokens of the bench's SFT conversations, tokenized as its runners do."""
    from benchmarks import assets
    from starpo.stages.sft import tokenize_sft_rows
    docs = tokenize_sft_rows(tok, assets.sft_rows(n, lo=sizes["lo"], hi=sizes["hi"]),
                             progress=False, log=lambda *a: None)
    return sum(len(d.input_ids) for d in docs) / n


# --------------------------------------------------------------------------- the steps

def build_model(work: Path, shape: dict, name: str, realdata: Path) -> Path:
    """A Llama of ``shape`` with random weights (seed 0, bf16) and the GPT-2 tokenizer
    with ChatML, saved to ``work/name``; its parameter count goes to ``work/model.json``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from starpo.model.loading import save_pretrained
    tok = _tokenizer(realdata)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # fast init on a GPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = work / name
    save_pretrained(model, tok, path)
    info_file = work / "model.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info[name] = {"parameters": sum(p.numel() for p in model.parameters()), **shape}
    info_file.write_text(json.dumps(info, indent=2))
    return path


def _models_main(work: str, cpu: bool, realdata: str) -> int:
    w = Path(work)
    for shape, name in ((CPU_MODEL if cpu else MODEL, "model"),
                        (CPU_LARGE_MODEL if cpu else LARGE_MODEL, "model-large")):
        t = time.time()
        build_model(w, shape, name, Path(realdata))
        print(f"{name}: {json.loads((w / 'model.json').read_text())[name]['parameters']:,} "
              f"parameters in {time.time() - t:.1f} s", flush=True)
    return 0


def _env_main() -> int:
    """The env step: the GPU, the Python packages the check runs with (and where from),
    and the attention kernels this torch offers."""
    import importlib
    out = {"python": sys.version.split()[0], "executable": sys.executable,
           "pythonpath": os.environ.get("PYTHONPATH", "")}
    for m in ("torch", "transformers", "tokenizers", "accelerate", "datasets", "trl",
              "pydantic", "safetensors", "pytest", "triton", "huggingface_hub", "flash_attn",
              "vllm"):
        if importlib.util.find_spec(m) is None:
            out[m] = None
            continue
        try:
            mod = importlib.import_module(m)
            out[m] = f"{getattr(mod, '__version__', '?')}  {os.path.dirname(mod.__file__)}"
        except Exception as err:  # reported, the check goes on
            out[m] = f"import failed: {err!r}"
    import torch
    cuda = torch.cuda.is_available()
    out.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0) if cuda else None,
               bf16=cuda and torch.cuda.is_bf16_supported(), cpus=os.cpu_count())
    out["varlen importable"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    out["flex importable"] = \
        importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    if cuda:
        from starpo.model.attention import varlen_device
        out["varlen offered (starpo's start-up check)"] = varlen_device(torch.device("cuda"))
    smi = shutil.which("nvidia-smi")
    if smi:
        print(subprocess.run([smi], capture_output=True, text=True).stdout, flush=True)
    print(json.dumps(out, indent=1))
    return 0


def _imports_main() -> int:
    """The install step's check: every module of :data:`NEEDED_MODULES` and starpo import."""
    import importlib
    missing = []
    for m in (*NEEDED_MODULES, "starpo"):
        try:
            mod = importlib.import_module(m)
            print(m, getattr(mod, "__version__", "?"), mod.__file__, flush=True)
        except Exception as err:  # every missing one is listed
            missing.append(f"{m} ({err.__class__.__name__}: {err})")
    if missing:
        print("missing: " + "; ".join(missing))
        return 1
    return 0


class Runner:
    """Runs the steps, each with its own limit and under one deadline, and records them."""

    def __init__(self, work: Path, env: dict, deadline: float):
        self.work, self.env, self.deadline = work, env, deadline
        self.log: list[dict] = []

    def step(self, name: str, cmd: list[str], limit: float) -> bool:
        left = self.deadline - time.time()
        if left < 5:
            self.log.append({"step": name, "rc": None, "seconds": 0, "limit": 0,
                             "skipped": "no time left before the deadline"})
            print(f"[{name}] skipped: no time left", flush=True)
            return False
        lim = min(limit, left)
        t0 = time.time()
        with (self.work / f"{name}.txt").open("w") as f:
            f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env=self.env, timeout=lim).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        rec = {"step": name, "rc": rc, "seconds": round(time.time() - t0, 1),
               "limit": round(lim, 1)}
        if rc == 124:
            rec["note"] = "time limit"
        self.log.append(rec)
        print(f"[{name}] rc {rc} in {rec['seconds']} s (limit {rec['limit']:.0f})", flush=True)
        return rc == 0

    def skip(self, name: str, why: str) -> None:
        self.log.append({"step": name, "rc": None, "seconds": 0, "skipped": why})
        print(f"[{name}] skipped: {why}", flush=True)


def pipeline_table(work: Path) -> str:
    info = json.loads((work / "model.json").read_text())["model"]
    n = info["parameters"]
    rows = ["| stage | tokens/s | pairs/s | MFU of 989 | MFU of 790 |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for stage in ("sft", "dpo", "reward"):
        path = work / "pipeline" / stage / "metrics.jsonl"
        if not path.is_file():
            rows.append(f"| {stage} | (no metrics) | | | |")
            continue
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        recs = [r for r in recs if "tokens_per_s" in r]
        if not recs:
            rows.append(f"| {stage} | (no tokens/s logged) | | | |")
            continue
        timed = recs[1:] or recs       # the first window carries one-time costs
        tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
        summary = json.loads((work / "pipeline" / stage / "stage.json").read_text())
        pairs = summary.get("pairs")
        pps = f"{pairs / summary['seconds']:.1f}" if pairs and summary.get("seconds") else ""
        rows.append(f"| {stage} | {tps:,.0f} | {pps} | {6 * n * tps / DATASHEET_BF16_FLOPS:.1%} "
                    f"| {6 * n * tps / MEASURED_BF16_FLOPS:.1%} |")
    return "\n".join(rows) + "\n"


def summary(work: Path, log: list[dict], plan: dict) -> str:
    parts = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n",
             f"backends: {plan['backends']['attn_implementation']}, generation "
             f"{plan['backends']['generation_backend']} ({plan['backends']['why']})\n",
             "| step | rc | seconds | limit | note |", "| --- | ---: | ---: | ---: | --- |"]
    for s in log:
        parts.append(f"| {s['step']} | {'' if s['rc'] is None else s['rc']} | {s['seconds']} "
                     f"| {s.get('limit', '')} | {s.get('skipped') or s.get('note') or ''} |")
    try:
        pipe = pipeline_table(work)
    except (OSError, ValueError, KeyError) as err:
        pipe = f"(no pipeline table: {err})\n"
    parts.append("\nPipeline training stages (mean of the logged windows after the first; "
                 "MFU = 6·N·tokens/s):\n\n" + pipe)
    bench = work / "bench" / "bench.md"
    parts.append("starpo vs TRL (scripts/gpu_bench.py):\n\n" +
                 (bench.read_text() if bench.is_file() else "(no bench results)\n"))
    return "\n".join(parts)


def pack(work: Path, dest: Path, log: list[dict], plan: dict) -> list[str]:
    """At most :data:`PACK_MAX_FILES` files into ``dest`` (what the lent machine sends
    back); returns their names."""
    dest.mkdir(parents=True, exist_ok=True)
    t = summary(work, log, plan)
    (work / "table.md").write_text(t)
    (dest / "table.md").write_text(t)
    left_out: list[str] = []
    copies = {"bench.json": work / "bench" / "bench.json", "env.txt": work / "env.txt",
              "gpu-tests.txt": work / "gpu-tests.txt",
              "eval-summary.json": work / "pipeline" / "eval" / "summary.json"}
    for name, src in copies.items():
        if src.is_file():
            shutil.copyfile(src, dest / name)
    files = sorted((p for p in work.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                    and p.name not in TOKENIZER_FILES and dest not in p.parents
                    and not {"site", "checkpoints"} & set(p.relative_to(work).parts)),
                   key=lambda p: (p.stat().st_size, str(p)))      # the most files that fit
    total = 0
    with tarfile.open(dest / "logs.tgz", "w:gz") as tf:
        for p in files:
            size = p.stat().st_size
            if total + size > LOGS_MAX_BYTES:     # uncompressed bytes: a safe upper bound
                left_out.append(str(p.relative_to(work)))
                continue
            total += size
            tf.add(p, arcname=str(p.relative_to(work)))
    (dest / "steps.json").write_text(json.dumps(
        {"steps": log, "logs_left_out": left_out,
         "plan": {k: v for k, v in plan.items() if k != "recipe"}}, indent=2))
    names = sorted(p.name for p in dest.iterdir())
    if len(names) > PACK_MAX_FILES or set(names) - set(PACK_FILES):
        raise SystemExit(f"pack: {dest} holds {names}; only {PACK_MAX_FILES} files of "
                         f"{PACK_FILES} come back from the lent machine")
    return names


# --------------------------------------------------------------------------- main

def _env(work: Path, site: Path | None) -> dict:
    path = [str(site)] if site else []
    path += [str(ROOT / "src"), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


def install_cmd(wheels: str | None, site: Path) -> list[str]:
    """The install step: the wheels into ``site`` (no index, no dependency resolution: the
    folder is the whole set), then the import check of :data:`NEEDED_MODULES`."""
    py = shlex.quote(sys.executable)
    check = f"{py} {shlex.quote(str(Path(__file__).resolve()))} _imports"
    if not wheels:
        return ["bash", "-c", check]
    pip = (f"{py} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
           f"--upgrade --target {shlex.quote(str(site))} "
           f"{shlex.quote(str(Path(wheels).resolve()))}/*.whl")
    return ["bash", "-c", f"set -e; {pip}; {check}"]


def make_plan(a, work: Path) -> dict:
    cpu = a.cpu
    limits = limits_for(cpu)
    skip = set(filter(None, (a.skip or "").split(",")))
    unknown = skip - set(STEPS)
    if unknown:
        print(f"gpu_check: unknown step(s) in --skip: {', '.join(sorted(unknown))} "
              f"(steps: {', '.join(STEPS)})", file=sys.stderr)
        raise SystemExit(2)
    if a.bench_configs:
        try:
            _import_bench().select(a.bench_configs)
        except SystemExit as err:
            print(f"gpu_check: --bench-configs: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    realdata = find_realdata(a.realdata)
    return {"work": str(work), "cpu": cpu, "steps": STEPS, "skip": sorted(skip),
            "limits_s": limits, "budget_s": budget_for(cpu), "hard_limit_s": HARD_LIMIT_S,
            "pack_reserve_s": PACK_RESERVE_S, "backends": backends(),
            "realdata": str(realdata),
            "realdata_looked_in": [str(p) for p in realdata_candidates(a.realdata)],
            "wheels": wheels_report(a.wheels), "gpu_test_files": gpu_test_files(),
            "bench_configs": a.bench_configs, "pack_files": list(PACK_FILES),
            "recipe": shrunk_recipe(str(work / "model"), realdata, cpu=cpu)}


def dry_run(plan: dict, a) -> int:
    problems = list(plan["wheels"]["problems"])
    realdata = Path(plan["realdata"])
    missing = [str(p) for p in data_files(realdata) if not p.is_file()]
    if missing:
        problems.append(f"data files not found: {', '.join(missing)} (looked for realdata in "
                        f"{', '.join(plan['realdata_looked_in'])}; --realdata DIR)")
    if not plan["cpu"] and sum(plan["limits_s"].values()) > plan["budget_s"]:
        problems.append(f"step limits add up to {sum(plan['limits_s'].values())} s, over the "
                        f"{plan['budget_s']} s deadline")
    if plan["budget_s"] + PACK_RESERVE_S > HARD_LIMIT_S and not plan["cpu"]:
        problems.append("the deadline leaves no time to pack before gpu_check.sh's timeout")
    if len(plan["pack_files"]) > PACK_MAX_FILES:
        problems.append(f"{len(plan['pack_files'])} files to pack, {PACK_MAX_FILES} come back")
    if not plan["gpu_test_files"]:
        problems.append("no test file has gpu-marked tests")
    try:
        from starpo.recipe import recipe_from_dict
        recipe_from_dict(plan["recipe"])           # validates, or raises the recipe error
    except Exception as err:  # any failure is the one line to report
        problems.append(f"the shrunk recipe does not validate: {err}")
    if not missing:
        bench = bench_plan(plan["limits_s"]["bench"], plan["bench_configs"], realdata,
                           cpu=plan["cpu"])
        plan["bench"] = bench
        problems += bench["problems"]
    plan["problems"] = problems
    out = Path(plan["work"]) / "plan.json"
    out.write_text(json.dumps(plan, indent=2))
    b = plan["backends"]
    print(f"plan: {', '.join(s for s in STEPS if s not in plan['skip'])}, then table and pack "
          f"(≤ {PACK_MAX_FILES} files); deadline {plan['budget_s']} s "
          f"(limits {sum(plan['limits_s'].values())} s), hard stop {HARD_LIMIT_S} s")
    print(f"backends: {b['attn_implementation']} + generation {b['generation_backend']} "
          f"({b['why']}); realdata: {plan['realdata']}")
    w = plan["wheels"]
    if w["dir"]:
        print(f"wheels: {len(w['wheels'])} distributions in {w['dir']} → {plan['work']}/site")
    if "bench" in plan:
        sure = [c["name"] for c in plan["bench"]["configs"] if c["sure"]]
        maybe = [c["name"] for c in plan["bench"]["configs"] if not c["sure"]]
        print(f"bench: {', '.join(sure)}" + (f"; if time is left: {', '.join(maybe)}"
                                             if maybe else ""))
    for p in problems:
        print("problem:", p)
    print(f"→ {out}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_models"]:        # the steps that run this file in their own process
        return _models_main(argv[1], argv[2] == "cpu", argv[3])
    if argv[:1] == ["_env"]:
        return _env_main()
    if argv[:1] == ["_imports"]:
        return _imports_main()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/gpu-check-{time.strftime('%Y%m%d-%H%M%S')}",
                    help="the work directory (models, logs, results)")
    ap.add_argument("--pack", default=None,
                    help=f"where the ≤ {PACK_MAX_FILES} result files go (default OUT/pack)")
    ap.add_argument("--wheels", default=None,
                    help="install every wheel of this directory (no registry is used)")
    ap.add_argument("--realdata", default=None, help="the realdata directory (see above)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps of {', '.join(STEPS)}")
    ap.add_argument("--bench-configs", default=None,
                    help="gpu_bench.py --configs (default: its default set)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--cpu", action="store_true",
                    help="the wiring check: every step on a CPU with tiny models and sizes")
    a = ap.parse_args(argv)
    t_start = time.time()
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.wheels and not Path(a.wheels).is_dir():
        print(f"gpu_check: --wheels {a.wheels}: no such directory", file=sys.stderr)
        return 2
    plan = make_plan(a, work)
    if a.dry_run:
        return dry_run(plan, a)
    import yaml
    deadline = t_start + plan["budget_s"]
    site = work / "site" if a.wheels else None
    run = Runner(work, _env(work, site), deadline)
    limits, skip, py = plan["limits_s"], set(plan["skip"]), sys.executable
    (work / "recipe.yaml").write_text(yaml.safe_dump(plan["recipe"], sort_keys=False))
    ok = {}
    for name in STEPS:
        if name in skip:
            run.skip(name, "--skip")
            continue
        if name in ("bench", "pipeline") and not ok.get("model"):
            run.skip(name, "no model (the model step failed)")
            continue
        if name == "install":
            cmd = install_cmd(a.wheels, work / "site")
        elif name == "env":
            cmd = [py, str(Path(__file__).resolve()), "_env"]
        elif name == "model":
            cmd = [py, str(Path(__file__).resolve()), "_models", str(work),
                   "cpu" if a.cpu else "gpu", plan["realdata"]]
        elif name == "gpu-tests":
            cmd = [py, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                   f"--junitxml={work / 'gpu-tests.xml'}", *plan["gpu_test_files"]]
        elif name == "bench":
            left = min(limits[name], deadline - time.time())
            cmd = [py, str(ROOT / "scripts" / "gpu_bench.py"),
                   *bench_args(work, a.cpu, left, a.bench_configs)]
        else:
            cmd = [py, "-m", "starpo.cli", "run", str(work / "recipe.yaml"), "--out",
                   str(work / "pipeline"), "-q"]
        ok[name] = run.step(name, cmd, limits[name])
    dest = Path(a.pack).resolve() if a.pack else work / "pack"
    names = pack(work, dest, run.log, plan)
    print((work / "table.md").read_text())
    print(f"packed {len(names)} files into {dest}: {', '.join(names)} "
          f"({time.time() - t_start:.0f} s in all)")
    failed = [s["step"] for s in run.log if s["rc"] not in (0, None)
              or (s["rc"] is None and s.get("skipped") != "--skip")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
