"""scripts/gpu_check.sh and scripts/gpu_bench.py as far as a CPU allows, kept fast: the
dry run (the plan fits 8 minutes, the shrunk recipe validates with the backends this
machine would pick, the data is found, the wheels are checked, the bench's data gives its
timed steps), the pure parts (backend choice, where realdata is looked for, the install
command, the packing into ≤ 8 files, the deadline, the bench's selection, table and
ratios), and the bench's runners on a microscopic CPU model in this process.

Not here, because it takes minutes: the wiring check, every step end to end on a CPU —

    STARPO_REALDATA=../shared/realdata scripts/gpu_check.sh --cpu --out /tmp/gc-cpu

(add ``--wheels DIR`` with wheels built for this machine's Python to try the install
step too). What needs the GPU — bf16, the varlen and compiled flex kernels, the figures —
runs only on the GPU machine (BENCHMARKS.md, "GPU check")."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod            # dataclasses look their module up while defined
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gc():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def gb():
    return _load("gpu_bench")


@pytest.fixture(scope="module")
def realdata(gc):
    d = gc.find_realdata()
    if not all(p.is_file() for p in gc.data_files(d)):
        pytest.skip(f"no realdata (looked in {[str(p) for p in gc.realdata_candidates()]})")
    return d


# --------------------------------------------------------------------------- dry run

def _fake_wheels(d: Path, gc, extra: tuple = (), drop: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in gc.CARRIED:
        if name != drop:
            (d / f"{name.replace('-', '_')}-1.0-py3-none-any.whl").write_bytes(b"")
    for f in extra:
        (d / f).write_bytes(b"")
    return d


def test_dry_run_checks_the_plan(tmp_path, gc, realdata):
    env = {**os.environ, "PYTHON": sys.executable, "STARPO_REALDATA": str(realdata)}
    wheels = _fake_wheels(tmp_path / "whl", gc)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run",
                          "--out", str(tmp_path / "gc"), "--wheels", str(wheels)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    plan = json.loads((tmp_path / "gc" / "plan.json").read_text())
    assert plan["problems"] == []
    assert plan["steps"] == ["install", "env", "model", "gpu-tests", "bench", "pipeline"]
    # every step's limit inside the deadline, the deadline + packing inside the hard stop
    assert sum(plan["limits_s"].values()) <= plan["budget_s"]
    assert plan["budget_s"] + plan["pack_reserve_s"] <= plan["hard_limit_s"] == 480
    assert len(plan["pack_files"]) <= 8
    # the backends this machine has: no flash-attn, no vLLM here → sdpa and the HF backend
    want_attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    want_gen = "vllm" if importlib.util.find_spec("vllm") else "hf"
    r = plan["recipe"]
    assert r["model"] == {"name_or_path": str(tmp_path / "gc" / "model"), "dtype": "auto",
                          "attn_implementation": want_attn}
    assert [s["type"] for s in r["stages"]] == ["sft", "dpo", "reward", "online", "eval"]
    stages = {s["type"]: s for s in r["stages"]}
    assert stages["online"]["generation"]["backend"] == want_gen
    assert stages["eval"]["generation"]["backend"] == want_gen
    assert plan["realdata"] == str(realdata)
    assert set(plan["wheels"]["wheels"]) == set(gc.CARRIED)
    assert "tests/model/test_gpu_attention.py" in plan["gpu_test_files"]
    bench = plan["bench"]
    names = [c["name"] for c in bench["configs"]]
    assert names[:4] == ["sft-starpo-varlen", "sft-trl", "dpo-starpo-varlen", "dpo-trl"]
    assert {"sft-trl-gc", "dpo-trl-gc", "sft-large-starpo-varlen", "generation",
            "sft-starpo-flex", "dpo-starpo-flex", "sft-starpo-varlen-gc",
            "dpo-starpo-varlen-gc"} <= set(names)
    assert bench["configs"][0]["sure"]
    # the data gives every training configuration its steps, ≥ 30 of them timed
    for kind, s in bench["steps"].items():
        assert s["micro_batches_estimated"] >= s["micro_batches_needed"], kind
        assert s["timed_steps"] >= 30, kind
    assert bench["large_sizes"]["sft_batch"] * bench["large_sizes"]["grad_accum"] \
        * bench["sizes"]["sft_len"] == 32 * 1024                    # 32k tokens per step
    assert "bench: sft-starpo-varlen" in res.stdout


def test_dry_run_reports_missing_data_and_bad_wheels(tmp_path, gc):
    wheels = _fake_wheels(tmp_path / "whl", gc, drop="trl",
                          extra=("pydantic-2.0-py3-none-any.whl",
                                 "zz-1.0-cp311-cp311-manylinux2014_x86_64.whl",
                                 "zy-1.0-cp312-cp312-macosx_11_0_arm64.whl",
                                 "zx-1.0-cp312-cp312-manylinux_2_17_x86_64.whl"))
    env = {**os.environ, "PYTHON": sys.executable, "STARPO_REALDATA": str(tmp_path / "none")}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run",
                          "--out", str(tmp_path / "gc"), "--wheels", str(wheels),
                          "--realdata", str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr
    problems = json.loads((tmp_path / "gc" / "plan.json").read_text())["problems"]
    assert any("no wheel of trl" in p for p in problems)
    assert any("pydantic in 2 versions" in p for p in problems)
    wrong = [p for p in problems if "is not for the lent machine" in p]
    assert len(wrong) == 2 and any("zz-1.0-cp311" in p for p in wrong) \
        and any("zy-1.0-cp312-cp312-macosx" in p for p in wrong)
    assert any("data files not found" in p and "nowhere" in p for p in problems)
    assert res.stdout.count("problem:") == len(problems)


def test_bad_arguments_are_one_line_and_status_2(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"),
                               "--dry-run", "--out", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=60)
    for args, line in (
            (["--wheels", str(tmp_path / "nope")],
             f"gpu_check: --wheels {tmp_path / 'nope'}: no such directory"),
            (["--skip", "bench,warp"], "gpu_check: unknown step(s) in --skip: warp (steps: "
                                       "install, env, model, gpu-tests, bench, pipeline)"),
            (["--bench-configs", "sft-trl,sft-nope"], "gpu_check: --bench-configs: unknown "
                                                      "configuration(s): sft-nope")):
        res = run(*args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), lines


# --------------------------------------------------------------------------- pure parts

def test_backends_follow_what_is_installed(gc, monkeypatch):
    real = importlib.util.find_spec
    for present, attn, gen in (((), "sdpa", "hf"),
                               (("flash_attn", "vllm"), "flash_attention_2", "vllm"),
                               (("vllm",), "sdpa", "vllm")):
        monkeypatch.setattr(gc.importlib.util, "find_spec",
                            lambda m, present=present: object() if m in present else
                            (None if m in ("flash_attn", "vllm") else real(m)))
        b = gc.backends()
        assert (b["attn_implementation"], b["generation_backend"]) == (attn, gen)


def test_shrunk_recipe_validates_with_either_backend(gc, tmp_path):
    from starpo.recipe import recipe_from_dict
    for chosen in ({"attn_implementation": "sdpa", "generation_backend": "hf"},
                   {"attn_implementation": "flash_attention_2", "generation_backend": "vllm"}):
        for cpu in (False, True):
            r = gc.shrunk_recipe(str(tmp_path / "m"), tmp_path, cpu=cpu, chosen=chosen)
            recipe_from_dict(r)
            assert r["model"]["attn_implementation"] == chosen["attn_implementation"]
            assert {s["generation"]["backend"] for s in r["stages"] if "generation" in s} \
                == {chosen["generation_backend"]}


def test_realdata_is_looked_for_inside_the_repository_then_beside_it(gc, tmp_path,
                                                                      monkeypatch):
    monkeypatch.delenv("STARPO_REALDATA", raising=False)
    repo = tmp_path / "work" / "repo"
    monkeypatch.setattr(gc, "ROOT", repo)
    inside, beside = repo / "shared" / "realdata", repo.parent / "shared" / "realdata"
    assert gc.realdata_candidates() == [inside, beside]
    assert gc.find_realdata() == inside                   # none exists: the first is named
    beside.mkdir(parents=True)
    assert gc.find_realdata() == beside                   # the development machine's layout
    inside.mkdir(parents=True)
    assert gc.find_realdata() == inside                   # the lent machine's layout
    monkeypatch.setenv("STARPO_REALDATA", str(tmp_path / "env"))
    assert gc.realdata_candidates()[0] == tmp_path / "env"
    assert gc.realdata_candidates(str(tmp_path / "flag"))[0] == tmp_path / "flag"


def test_install_uses_only_the_carried_wheels(gc, tmp_path):
    site = tmp_path / "site"
    cmd = gc.install_cmd(str(tmp_path / "whl"), site)[-1]
    assert "--no-index" in cmd and "--no-deps" in cmd and f"--target {site}" in cmd
    assert f"{tmp_path / 'whl'}/*.whl" in cmd and cmd.index("pip install") < cmd.index("_imports")
    no_wheels = gc.install_cmd(None, site)[-1]
    assert "pip" not in no_wheels and "_imports" in no_wheels   # nothing installed at all


def test_steps_run_with_the_site_and_src_first_on_the_path(gc, tmp_path):
    env = gc._env(tmp_path, tmp_path / "site")
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(tmp_path / "site"),
                                                       str(gc.ROOT / "src")]
    assert env["HF_HUB_OFFLINE"] == "1"


def test_a_step_runs_under_its_limit_and_the_deadline(gc, tmp_path):
    run = gc.Runner(tmp_path, dict(os.environ), deadline=time.time() + 60)
    assert run.step("quick", [sys.executable, "-c", "print('hi')"], 30)
    assert not run.step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    run.deadline = time.time() + 2              # less than a step needs: not started
    assert not run.step("late", [sys.executable, "-c", "print('never')"], 30)
    assert [(s["step"], s["rc"]) for s in run.log] == [("quick", 0), ("slow", 124),
                                                       ("late", None)]
    assert run.log[1]["note"] == "time limit" and "no time left" in run.log[2]["skipped"]
    assert (tmp_path / "quick.txt").read_text().splitlines()[-1] == "hi"
    assert not (tmp_path / "late.txt").exists()


def test_results_pack_into_at_most_8_files(gc, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "bench" / "bench.json").write_text("{}")
    (work / "bench" / "bench.md").write_text("| bench |\n")
    (work / "env.txt").write_text("env\n")
    (work / "model.json").write_text(json.dumps({"model": {"parameters": 10}}))
    for sub in ("site/pkg", "pipeline/sft/checkpoints/step-1", "model"):
        (work / sub).mkdir(parents=True)
    (work / "site" / "pkg" / "METADATA.txt").write_text("x")
    (work / "pipeline" / "sft" / "checkpoints" / "step-1" / "state.json").write_text("{}")
    (work / "model" / "tokenizer.json").write_text("x" * 1000)
    (work / "pipeline" / "sft" / "big.jsonl").write_text("y" * 5000)
    (work / "pipeline" / "sft" / "metrics.jsonl").write_text("")
    monkeypatch.setattr(gc, "LOGS_MAX_BYTES", 2000)
    log = [{"step": "env", "rc": 0, "seconds": 1.0, "limit": 15}]
    plan = {"backends": {"attn_implementation": "sdpa", "generation_backend": "hf",
                         "why": "test"}, "recipe": {}}
    names = gc.pack(work, tmp_path / "out", log, plan)
    assert len(names) <= gc.PACK_MAX_FILES and set(names) <= set(gc.PACK_FILES)
    assert {"table.md", "steps.json", "bench.json", "env.txt", "logs.tgz"} <= set(names)
    with tarfile.open(tmp_path / "out" / "logs.tgz") as tf:
        packed = set(tf.getnames())
    assert "bench/bench.md" in packed and "env.txt" in packed
    assert not any(p.startswith("site/") or "checkpoints" in p or p.endswith("tokenizer.json")
                   for p in packed)
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert steps["logs_left_out"] == ["pipeline/sft/big.jsonl"]      # over the size cap
    assert steps["steps"] == log
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| env | 0 | 1.0 | 15 |" in table and "| bench |" in table


# --------------------------------------------------------------------------- the bench

def test_bench_selection_and_plan(gb):
    default = gb.select(None)
    assert [c.name for c in default] == [c.name for c in gb.CONFIGS if c.default]
    assert "sft-starpo-segments" not in [c.name for c in default]
    assert [c.name for c in gb.select("dpo-trl,sft-starpo-varlen")] == \
        ["sft-starpo-varlen", "dpo-trl"]                                # CONFIGS' order
    assert len(gb.select("all")) == len(gb.CONFIGS)
    with pytest.raises(SystemExit, match="unknown configuration"):
        gb.select("sft-nope")
    p = gb.plan(gb.select("sft-starpo-varlen,sft-trl"), gb.BY_NAME["sft-starpo-varlen"].limit_s)
    assert [x["sure"] for x in p] == [True, False]
    # TRL runs both ways, starpo's varlen too; starpo once per kernel; the larger work
    # eager and compiled
    trl = {(c.kind, c.gc) for c in default if c.framework == "trl"}
    assert trl == {("sft", False), ("sft", True), ("dpo", False), ("dpo", True)}
    assert {(c.kind, c.gc) for c in default if c.framework == "starpo" and c.kernel == "varlen"} \
        == trl
    assert {c.kernel for c in default if c.framework == "starpo" and c.kind == "sft"} \
        == {"varlen", "flex"}
    large = [c for c in default if c.large]
    assert [c.compiled for c in large] == [False, True]
    assert all(gb.sizes_for(c, gb.SIZES)["grad_accum"] == 2 for c in large)
    # what the targets need runs before the informational configurations
    names = [c.name for c in default]
    assert names.index("generation") < names.index("sft-trl-gc") < \
        names.index("sft-starpo-varlen-compiled")


def test_timing_window_skips_the_warm_up_steps(gb):
    ends = [10.0, 12.0, 13.0, 14.0, 15.0]
    assert gb._window(ends, {"warm_steps": 2}) == (3.0, 3)
    assert gb._window(ends, {"warm_steps": 0}) == (5.0, 4)
    with pytest.raises(SystemExit):
        gb._window(ends[:2], {"warm_steps": 2})


def _res(tps, peak, flops=1e14, **kw):
    return {"tokens_per_s": tps, "peak_gib": peak, "flops_per_s": flops, "warmup_s": 1.0,
            "timed_steps": 30, "tokens_per_step": 8192, **kw}


def test_table_ratios_against_trl_fastest_and_leanest_last(gb):
    res = {
        "sft-starpo-varlen": _res(60000, 10.0, kernel="varlen"),
        "sft-trl": _res(20000, 20.0),
        "sft-trl-gc": _res(15000, 8.0),
        "dpo-starpo-varlen": _res(30000, 12.0, pairs_per_s=90.0, kernel="varlen"),
        "dpo-trl": {"error": "rc 124 (time limit), see bench-dpo-trl.log"},
        "dpo-trl-gc": _res(12000, 7.5, pairs_per_s=20.0),
        "dpo-starpo-varlen-gc": _res(24000, 6.0, pairs_per_s=70.0, kernel="varlen"),
        "sft-large-starpo-varlen": _res(40000, 80.0, flops=3.5e14, kernel="varlen"),
        "sft-starpo-flex": {"skipped": "packed_attention=flex is not offered", "kernel": "x"},
        "generation": {"timer": "t", "online": {"sequences": 128, "tokens": 16000,
                                                "max_tokens": 16384, "seconds": 2.0,
                                                "tokens_per_s": 8000.0},
                       "eval": {"sequences": 121, "tokens": 15000, "max_tokens": 15488,
                                "seconds": 3.0, "tokens_per_s": 4700.0}},
    }
    t = gb.table(res)
    ratios = t[t.index("Ratios"):]
    assert t.index("Ratios") > t.index("Sampling")                 # ratios come last
    assert "| SFT tokens/s | sft-starpo-varlen | TRL fastest = sft-trl | 3.00× | ≥ 2× |" in ratios
    assert "TRL leanest = sft-trl-gc | 1.25× |" in ratios
    assert "same checkpointing | sft-starpo-varlen | sft-trl | 0.50× | ≤ 1× |" in ratios
    # the DPO TRL run without checkpointing failed: the fastest that ran is the one
    assert "| dpo-starpo-varlen | TRL fastest = dpo-trl-gc | 4.50× | ≥ 4× |" in ratios
    # starpo with checkpointing on is held to TRL's memory at that setting
    assert "same checkpointing | dpo-starpo-varlen-gc | dpo-trl-gc | 0.80× | ≤ 1× |" in ratios
    assert "989 TFLOP/s (datasheet) | 35.4% |" in ratios
    assert "790 TFLOP/s (measured matmul) | 44.3% |" in ratios
    assert "| sampling tokens/s, eval | generation |" in ratios and "| 5.00× | ≥ 5× |" in ratios
    assert "(rc 124 (time limit)" in t and "(skipped: packed_attention=flex" in t
    assert "| 60,000 |" in t and "| 10.1% | 12.7% |" in t             # 1e14 of 989e12, 790e12


def test_bench_records_configurations_that_fail_or_do_not_fit(gb, tmp_path):
    """``all``: one child process per configuration, each under its limit; one that runs
    out of time is recorded, one that no longer fits the budget is skipped, neither fatal."""
    out = tmp_path / "b"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "all",
                          "--model", str(tmp_path), "--out", str(out), "--limit", "0.01",
                          "--configs", "sft-starpo-varlen,dpo-trl,sft-large-starpo-varlen"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    got = json.loads((out / "bench.json").read_text())["results"]
    assert got["sft-starpo-varlen"]["error"].startswith("rc 124")
    assert got["dpo-trl"]["error"].startswith("rc 124")
    assert got["sft-large-starpo-varlen"] == {"skipped": "no --large model"}
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "all",
                          "--model", str(tmp_path), "--out", str(out), "--budget", "5",
                          "--configs", "sft-trl"], capture_output=True, text=True, timeout=60)
    got = json.loads((out / "bench.json").read_text())["results"]
    assert got == {"sft-trl": {"skipped": "no time left in the budget"}}
    assert "(skipped: no time left" in (out / "bench.md").read_text()


# --------------------------------------------------------------------------- on a CPU model

TINY = {"sft_convs": 16, "sft_batch": 2, "sft_len": 256, "dpo_pairs": 8, "dpo_batch": 2,
        "dpo_len": 256, "hi": 16, "steps": 3, "warm_steps": 1, "online_prompts": 2,
        "online_n": 2, "eval_prompts": 2, "new_tokens": 4}


@pytest.fixture(scope="module")
def tiny_model(gc, realdata, tmp_path_factory):
    return str(gc.build_model(tmp_path_factory.mktemp("bench"), gc.CPU_MODEL, "model",
                              realdata))


def test_bench_runners_measure_on_cpu(gb, tiny_model, one_thread):
    """starpo's runners (SFT, DPO, sampling) and TRL's SFT runner in this process at a
    microscopic size: they run and count what they say (the wiring check runs every
    configuration, each in its own process)."""
    sizes = {**gb.SIZES, **TINY}
    res = {}
    for name in ("sft-starpo-varlen", "dpo-starpo-varlen", "generation") + \
            (("sft-trl",) if importlib.util.find_spec("trl") else ()):
        cfg = gb.BY_NAME[name]
        res[name] = gb.RUNNERS[(cfg.kind, cfg.framework)](cfg, tiny_model, sizes)
    for name in ("sft-starpo-varlen", "dpo-starpo-varlen") + (("sft-trl",) if "sft-trl" in res
                                                                else ()):
        r = res[name]
        assert r["steps"] == 3 and r["timed_steps"] == 2 and r["peak_gib"] is None
        assert r["tokens_per_s"] > 0 and r["flops_per_s"] > 0
    assert res["sft-starpo-varlen"]["kernel"] == "segments"    # varlen is CUDA-only
    assert res["dpo-starpo-varlen"]["one_row"] and res["dpo-starpo-varlen"]["pairs"] == 8
    gen = res["generation"]
    assert gen["online"]["sequences"] == 4 and gen["eval"]["sequences"] == 2
    assert 0 < gen["online"]["tokens"] <= gen["online"]["max_tokens"] == 2 * 2 * 4
    if "sft-trl" in res:
        assert res["sft-trl"]["trl_settings"]["gradient_checkpointing"] is False
    t = gb.table(res)
    assert "sft-starpo-varlen (ran segments)" in t
