"""The whole pipeline (sft → dpo → reward → online → eval) under ``accelerate launch`` with
two CPU processes (DDP over gloo), killed mid-stage and resumed, ends with the same eval
summary as one process with the same global batch (two processes × 1 micro-batch per
step = one process accumulating 2).

Tolerance: every metric within 1e-6 absolute and every evaluated response text identical.
Why that tight: (a) training is the same computation — each step sees the same
micro-batches, and DDP's average of the two processes' gradients, multiplied back by the
world size, is ``(g0 + g1) / 2 * 2``: scaling by a power of two is exact in floating
point and a sum of two terms has one order, so the weights come out bit for bit equal
to one process accumulating ``g0 + g1`` (measured: max |Δw| = 0 for every stage);
(b) sharded sampling keeps every (prompt, sample) row on its own counter-based random
stream, so a row draws the same tokens wherever it runs; the only thing that changes is
how rows are batched and left-padded, which can move logits by float round-off, and a
draw flips only when its uniform lies within that round-off (~1e-7) of a token boundary;
(c) the numbers are deterministic on one machine, so this is not a flaky bound. 1e-6
leaves room for the log-prob sums of differently padded batches (KL terms), nothing
more: a real sharding bug (a prompt sampled twice, a block in the wrong order, the
wrong stream index) changes responses and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil   # an accelerate dependency
import pytest
import yaml

from conftest import TINY

STEP = {"log_every": 1, "warmup_ratio": 0.0}
RECIPE = {
    "name": "mp", "seed": 0, "model": {"name_or_path": "tiny", "tiny": TINY},
    "stages": [
        # long enough (16 steps, a checkpoint every 4) to be killed in the middle
        {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 160}]},
         "packing": {"max_length": 128},
         "train": {**STEP, "lr": 3e-3, "max_steps": 16, "batch_size": 2, "save_every": 4}},
        {"type": "dpo", "beta": 0.5, "max_length": 128, "max_prompt_length": 64,
         "data": {"sources": [{"path": "world:preference", "n": 80}], "eval_fraction": 0.1},
         "train": {**STEP, "lr": 1e-3, "max_steps": 4, "batch_size": 4}},
        {"type": "reward", "model": "sft", "max_length": 128, "max_prompt_length": 64,
         "data": {"sources": [{"path": "world:preference", "n": 80}], "eval_fraction": 0.1},
         "train": {**STEP, "lr": 1e-3, "max_steps": 4, "batch_size": 4}},
        {"type": "online", "beta": 0.5, "max_length": 128, "max_prompt_length": 64,
         "rounds": 1, "prompts_per_round": 16, "n_samples": 4,
         "generation": {"temperature": 1.0, "max_new_tokens": 16, "batch_size": 16},
         "judge": {"type": "reward_model", "path": "reward", "batch_size": 16},
         "data": {"sources": [{"path": "world:prompt", "n": 64}]},
         "train": {**STEP, "lr": 1e-4, "max_steps": 2, "batch_size": 2}},
        {"type": "eval", "data": {"sources": [{"path": "world:eval", "n": 32}],
                                  "shuffle": False},
         "generation": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 24,
                        "batch_size": 16},
         "bootstrap": 200},
    ]}
TRAINED = ("sft", "dpo", "reward", "online")
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _starpo(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "starpo.cli", "run", str(recipe), "--out", str(out), "-q", "--no-report",
            *extra]


ROOT = Path(__file__).resolve().parents[2]


def _launch(recipe: Path, out: Path) -> list[str]:
    # the README's line with the shipped DDP config: accelerate starts the processes with
    # torchrun (`--cpu` would start only one); without a GPU the runtime picks gloo, and
    # the config's bf16 becomes no mixed precision (train.mixed_precision auto)
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
            "--num_processes", "2", "--main_process_port", str(_free_port()),
            *_starpo(recipe, out)]


def _numbers(summary: dict) -> dict:
    return {(m, k): v for m, d in summary.items() for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.mark.slow
def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    recipe = tmp_path / "mp.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    t0 = time.time()
    # one process, the same global batch: 2 micro-batches accumulated per step
    accum = [f"stages.{s}.train.grad_accum=2" for s in TRAINED]
    one = tmp_path / "one"
    subprocess.run([sys.executable, *_starpo(recipe, one, *accum)], check=True, env=_env(),
                   capture_output=True, timeout=600)

    # two processes, SIGKILLed once the sft stage has a checkpoint, then run again
    two = tmp_path / "two"
    proc = subprocess.Popen(_launch(recipe, two), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = two / "sft" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any((p / "state.json").is_file() for p in ckpts.glob("step_*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    # the workers too: torchrun starts them in sessions of their own, so killing the
    # launcher's process group alone leaves them running (they would finish the run
    # while the resumed one starts)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
        try:
            w.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(workers, timeout=30)
    proc.wait()
    assert not (two / "sft" / "stage.json").exists()
    res = subprocess.run(_launch(recipe, two), env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wall = time.time() - t0

    # it resumed (the metrics log continues from the checkpoint, no step twice)
    steps = [json.loads(l)["step"] for l in (two / "sft" / "metrics.jsonl").open()]
    assert steps == list(range(1, 17))
    # the eval stage ran in both processes and the main one wrote the summary
    assert "models" in json.loads((two / "eval" / "stage.json").read_text())

    a = json.loads((one / "eval" / "summary.json").read_text())
    b = json.loads((two / "eval" / "summary.json").read_text())
    assert a.keys() == b.keys() == {"sft", "dpo", "online"}
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys()
    for key in na:
        assert abs(na[key] - nb[key]) <= TOL, (key, na[key], nb[key])
    for m in a:
        ra = [json.loads(l)["response"] for l in (one / "eval" / f"{m}.jsonl").open()]
        rb = [json.loads(l)["response"] for l in (two / "eval" / f"{m}.jsonl").open()]
        assert ra == rb, m
    # the online round's sharded sampling and judging gathered every prompt, in order
    sa = [json.loads(l) for l in (one / "online" / "round_1" / "samples.jsonl").open()]
    sb = [json.loads(l) for l in (two / "online" / "round_1" / "samples.jsonl").open()]
    assert [r["prompt"] for r in sa] == [r["prompt"] for r in sb] and len(sa) == 16
    assert [[s["text"] for s in r["samples"]] for r in sa] == \
        [[s["text"] for s in r["samples"]] for r in sb]
    print(f"one process + two processes (killed, resumed): {wall:.1f} s")
