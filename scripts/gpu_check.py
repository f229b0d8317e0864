"""The GPU check behind ``scripts/gpu_check.sh``: one command, one output directory.

Steps (each with its own time limit, together under 8 minutes on one H200; a failing step
is recorded and the next one still runs):

    env        nvidia-smi, torch / CUDA / bf16 support            → OUT/env.txt
    install    what is missing of flash-attn, vLLM, TRL, pytest   → OUT/install.txt
               (pip from the registry, or --wheels DIR with --no-index when the machine
               has no registry access)
    gpu-tests  pytest -m gpu                                      → OUT/gpu-tests.{txt,xml}
    model      a Llama-shaped ~0.5B model from a config, random weights, with the real
               GPT-2 tokenizer from ../shared/realdata/tokenizers (ChatML added by starpo)
                                                                  → OUT/model/
    pipeline   a shrunk copy of recipes/hitchhiker/phi-3-medium.yaml on that model:
               sft → dpo → reward → online (vLLM) → eval (vLLM), flash-attention 2, bf16,
               local data (realdata PKU-SafeRLHF/HH-RLHF rows plus the embedded world)
                                                                  → OUT/pipeline/
    bench      starpo vs TRL, SFT and DPO side by side on the same model (scripts/gpu_bench.py:
               tokens/s, pairs/s, peak GPU memory from torch.cuda.max_memory_allocated, MFU
               against the H200's 790 TFLOP/s bf16 with model FLOPs = 6·N_body·tokens +
               6·H·V·targets (+ the forward-only reference pass, 2·N·D), ~12 steps each)
                                                                  → OUT/bench/bench.{md,json}
    table      tokens/s, pairs/s and MFU (same formula) of each pipeline training stage, from
               its metrics.jsonl, then the bench table               → OUT/table.md

The pipeline trains with dtype "auto": fp32 master weights under bf16 autocast (the
loop's mixed precision), as a user's recipe would on this GPU.

``--dry-run`` checks the plan without a GPU: the shrunk recipe validates, the tokenizer and
data files exist, the bench's configurations and their data build, and it lists the
installs it would make (OUT/plan.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"
H200_BF16_FLOPS = 790e12
# module → pip requirement
NEEDS = {"flash_attn": "flash-attn", "vllm": "vllm>=0.10", "trl": "trl==1.16.0",
         "pytest": "pytest>=8"}
# a Llama shape of ~0.5B parameters (Qwen2-0.5B's widths), GPT-2's vocabulary + ChatML
MODEL = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096,
         "tie_word_embeddings": True, "rope_theta": 1000000.0}
LIMITS = {"env": 10, "install": 70, "gpu-tests": 70, "model": 20, "pipeline": 150,
          "bench": 150}


def bench_plan() -> dict:
    """What the bench step runs, checked on any machine: its configurations, sizes, and
    that its data builds (benchmarks.assets, the rows both frameworks train on)."""
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]
    import gpu_bench
    rows = {k: len(gpu_bench._rows(k, gpu_bench.SIZES)) for k in ("sft", "dpo")}
    return {"configs": [f"{k}/{f}" for k, f in gpu_bench.CONFIGS], "sizes": gpu_bench.SIZES,
            "rows": rows, "limits_s": {f"{k}/{f}": s for (k, f), s in gpu_bench.LIMITS_S.items()},
            "peak_flops": gpu_bench.H200_BF16_FLOPS}


def install_plan(wheels: str | None) -> list[list[str]]:
    missing = [req for mod, req in NEEDS.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return []
    base = [sys.executable, "-m", "pip", "install", "-q"]
    if wheels:
        base += ["--no-index", "--find-links", wheels]
    # flash-attn builds against the installed torch: no build isolation
    return [base + (["--no-build-isolation"] if r == "flash-attn" else []) + [r]
            for r in missing]


def shrunk_recipe(model_dir: str) -> dict:
    """recipes/hitchhiker/phi-3-medium.yaml at smoke size on the check's model and local
    data, with the online stage (vLLM) the guide's recipe leaves out."""
    import yaml
    r = yaml.safe_load((ROOT / "recipes" / "hitchhiker" / "phi-3-medium.yaml").read_text())
    pku, hh = str(REALDATA / "pku_saferlhf.jsonl"), str(REALDATA / "hh_rlhf.jsonl")
    r["name"] = "gpu-check"
    r["model"] = {"name_or_path": model_dir, "dtype": "auto",
                  "attn_implementation": "flash_attention_2"}
    short = {"max_steps": 12, "batch_size": 8, "grad_accum": 1, "log_every": 5,
             "save_every": 10, "warmup_ratio": 0.1, "gradient_checkpointing": False}
    sft, dpo, ev = (r["stages"][i] for i in range(3))
    sft["data"]["sources"] = [{"path": pku, "use": "chosen"}, {"path": hh, "use": "chosen"},
                              {"path": "world:sft", "n": 2000}]
    sft["packing"]["max_length"] = 1024
    sft["train"].update(short, lr=1e-4)
    dpo["data"]["sources"] = [{"path": pku}, {"path": hh}, {"path": "world:preference", "n": 600}]
    dpo["max_length"], dpo["max_prompt_length"] = 512, 256
    dpo["train"].update(short, lr=1e-6)
    reward = {"type": "reward", "model": "sft", "max_length": 512, "max_prompt_length": 256,
              "data": dpo["data"], "train": {**short, "lr": 1e-5}}
    online = {"type": "online", "loss": "dpo", "beta": 0.1, "max_length": 512,
              "max_prompt_length": 256, "rounds": 1, "prompts_per_round": 64, "n_samples": 4,
              "generation": {"temperature": 0.8, "max_new_tokens": 128, "backend": "vllm"},
              "judge": {"type": "reward_model", "path": "reward", "batch_size": 32},
              "data": {"sources": [{"path": "world:prompt", "n": 256}]},
              "train": {**short, "max_steps": 4, "batch_size": 8}}
    ev["data"]["sources"] = [{"path": hh}, {"path": "world:eval", "n": 98}]
    ev["judge"] = {"type": "reward_model", "path": "reward", "batch_size": 32}
    ev["generation"].update(max_new_tokens=256, backend="vllm")
    ev["bootstrap"] = 200
    r["stages"] = [sft, dpo, reward, online, ev]
    return r


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from starpo.model.loading import save_pretrained
    from starpo.recipe import ModelSpec
    from starpo.model import loading
    tok_dir = REALDATA / "tokenizers" / "gpt2"
    tok = loading.load_tokenizer(str(tok_dir), ModelSpec(name_or_path=str(tok_dir)))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODEL)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = out / "model"
    save_pretrained(model, tok, path)
    n = sum(p.numel() for p in model.parameters())
    (out / "model.json").write_text(json.dumps({"parameters": n, **MODEL}))
    del AutoTokenizer
    return path


def table(out: Path) -> str:
    n = json.loads((out / "model.json").read_text())["parameters"]
    rows = ["| stage | tokens/s | pairs/s | MFU (6·N·tok/s ÷ 790 TFLOP/s) |",
            "| --- | --- | --- | --- |"]
    for stage in ("sft", "dpo", "reward"):
        path = out / "pipeline" / stage / "metrics.jsonl"
        if not path.is_file():
            rows.append(f"| {stage} | (no metrics) | | |")
            continue
        recs = [json.loads(l) for l in path.read_text().splitlines()][1:] or \
            [json.loads(l) for l in path.read_text().splitlines()]
        tps = sum(r.get("tokens_per_s", 0.0) for r in recs) / len(recs)
        summary = json.loads((out / "pipeline" / stage / "stage.json").read_text())
        pairs = summary.get("pairs")
        pps = (pairs and summary.get("seconds") and f"{pairs / summary['seconds']:.1f}") or ""
        rows.append(f"| {stage} | {tps:,.0f} | {pps} | {6 * n * tps / H200_BF16_FLOPS:.1%} |")
    bench = out / "bench" / "bench.md"
    rows.append("\nstarpo vs TRL (scripts/gpu_bench.py):\n")
    rows.append(bench.read_text() if bench.is_file() else "(no bench results)\n")
    return "\n".join(rows) + "\n"


def _step(name: str, cmd: list[str], out: Path, log: list[dict]) -> bool:
    t0 = time.time()
    with (out / f"{name}.txt").open("w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                timeout=LIMITS[name]).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    log.append({"step": name, "rc": rc, "seconds": round(time.time() - t0, 1)})
    print(f"[{name}] rc {rc} in {log[-1]['seconds']} s", flush=True)
    return rc == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"runs/gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--wheels", default=None, help="directory of wheels (no registry access)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = shrunk_recipe(str(out / "model"))
    plan = {"out": str(out), "installs": install_plan(a.wheels), "steps": list(LIMITS) + ["table"],
            "limits_s": LIMITS, "recipe": recipe}
    if a.dry_run:
        from starpo.recipe import recipe_from_dict
        problems = [str(p) for p in (REALDATA / "tokenizers" / "gpt2" / "tokenizer.json",
                                     REALDATA / "pku_saferlhf.jsonl", REALDATA / "hh_rlhf.jsonl")
                    if not p.is_file()]
        recipe_from_dict(recipe)           # validates, or raises the recipe error
        plan["missing_files"] = problems
        plan["bench"] = bench_plan()
        (out / "plan.json").write_text(json.dumps(plan, indent=2))
        print(f"plan: {', '.join(plan['steps'])}; total limit {sum(LIMITS.values())} s")
        for cmd in plan["installs"]:
            print("would install:", " ".join(cmd[cmd.index("install") + 2:]))
        for p in problems:
            print("missing:", p)
        print(f"→ {out / 'plan.json'}")
        return 1 if problems else 0
    import yaml
    log: list[dict] = []
    py = sys.executable
    _step("env", ["bash", "-c", "nvidia-smi; " + py + " -c \"import torch; print(torch.__version__,"
                  " torch.version.cuda, torch.cuda.get_device_name(0),"
                  " torch.cuda.is_bf16_supported())\""], out, log)
    cmds = install_plan(a.wheels)
    _step("install", ["bash", "-c", " && ".join(" ".join(f"'{x}'" for x in c) for c in cmds)
                      or "true"], out, log)
    _step("gpu-tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests",
                        f"--junitxml={out / 'gpu-tests.xml'}"], out, log)
    ok = _step("model", [py, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                         f"import gpu_check, pathlib; gpu_check.build_model(pathlib.Path("
                         f"{str(out)!r}))"], out, log)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if ok:
        _step("pipeline", [py, "-m", "starpo.cli", "run", str(out / "recipe.yaml"), "--out",
                           str(out / "pipeline"), "-q"], out, log)
        _step("bench", [py, str(ROOT / "scripts" / "gpu_bench.py"), "all", "--model",
                        str(out / "model"), "--out", str(out / "bench")], out, log)
    try:
        t = table(out)
    except (OSError, ValueError, KeyError) as err:
        t = f"(no table: {err})\n"
    (out / "table.md").write_text(t)
    print(t)
    (out / "steps.json").write_text(json.dumps(log, indent=2))
    return 0 if all(s["rc"] == 0 for s in log) else 1


if __name__ == "__main__":
    sys.exit(main())
