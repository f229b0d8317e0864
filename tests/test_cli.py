"""The ``starpo`` command as a user meets it: start-up that loads no torch for help,
validation and dry runs; help that reads at 80 columns; the plan before the recipe; one
exit status per kind of outcome, ``--debug`` included; ``--check``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
COMMANDS = ["run", "eval", "sweep", "reproduce", "report"]


def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": str(columns)}
    env.pop("STARPO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "starpo.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)


# what a command imported when it ended: printed by an atexit hook so it runs after typer's
# SystemExit as well
_PROBE = ("import atexit, sys\n"
          "atexit.register(lambda: print('HEAVY=' + ','.join(sorted(m for m in ('torch', "
          "'transformers', 'accelerate', 'datasets') if m in sys.modules)), file=sys.stderr))\n"
          "sys.argv = ['starpo'] + sys.argv[1:]\n"
          "from starpo.cli import main\n"
          "main()\n")


def _heavy_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=ROOT)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("HEAVY=")][-1]
    return {m for m in line[len("HEAVY="):].split(",") if m}, p


@pytest.mark.parametrize("args", [
    ["--help"], ["run", "--help"], ["sweep", "--help"],
    ["run", str(QUICKSTART), "stages.dpo.betta=1"],               # a validation error
    ["run", str(QUICKSTART), "--dry-run", "--out", "/nonexistent/starpo-test"],
], ids=["help", "run-help", "sweep-help", "bad-key", "dry-run"])
def test_help_validation_and_dry_run_load_no_torch(args):
    """What makes ``starpo --help`` take seconds is importing torch/transformers; these
    paths must not (the start-up time itself is machine-dependent; README gives it)."""
    heavy, p = _heavy_modules(*args)
    assert p.returncode in (0, 2), p.stderr
    assert heavy == set(), (args, heavy)


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help_reads_cleanly_at_80_columns(command):
    p = _cli(*([command] if command else []), "--help")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), \
        [line for line in lines if len(line) > 80]
    assert "<bool>" not in p.stdout                     # flags take no value
    assert "╭" not in p.stdout                          # plain text, no boxes
    if command is None:                                 # one listing line per command
        listing = p.stdout.split("Commands:")[1].splitlines()
        for name in COMMANDS:
            row = next(line for line in listing if line.strip().startswith(name + " "))
            assert not row.rstrip().endswith("..."), row  # a whole first sentence


def test_dry_run_prints_the_plan_first_and_the_recipe_only_on_request(tmp_path):
    p = _cli("run", str(QUICKSTART), "--out", str(tmp_path / "o"), "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"plan (run directory {tmp_path / 'o'}):"
    assert [ln.split()[0] for ln in lines[1:5]] == ["sft", "dpo", "online", "eval"]
    assert "to run" in lines[1] and len(lines) <= 8
    assert "name_or_path" not in p.stdout               # no YAML
    assert not (tmp_path / "o").exists()
    p = _cli("run", str(QUICKSTART), "--out", str(tmp_path / "o"), "--dry-run",
             "--show-recipe", "stages.dpo.beta=0.3")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.index("plan (run directory") < out.index("# resolved recipe")
    tree = yaml.safe_load(out.split("# resolved recipe\n", 1)[1])
    assert next(s for s in tree["stages"] if s["name"] == "dpo")["beta"] == 0.3


def test_bad_input_exits_2_with_one_line_and_debug_keeps_the_status():
    p = _cli("run", str(QUICKSTART), "stages.dpo.betta=1")
    assert p.returncode == 2
    assert p.stderr.strip() == (f"error: {QUICKSTART}: stages.dpo.betta: unknown key; did you "
                                f"mean `beta`?")
    d = _cli("--debug", "run", str(QUICKSTART), "stages.dpo.betta=1")
    assert d.returncode == 2                            # not 1: the same bad input
    assert "Traceback" in d.stderr and d.stderr.strip().endswith(p.stderr.strip())
    # a usage error (click's own) is bad input too
    u = _cli("run", str(QUICKSTART), "--no-such-flag")
    assert u.returncode == 2 and "No such option" in u.stderr


def test_check_without_expected_results_is_bad_input(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(QUICKSTART.read_text())
    p = _cli("run", str(recipe), "--out", str(tmp_path / "o"), "--check", "--dry-run")
    assert p.returncode == 2
    assert "mine.expected.yaml not found" in p.stderr and not (tmp_path / "o").exists()


def test_check_on_the_shipped_quickstart_dry_run_names_the_file(tmp_path):
    p = _cli("run", str(QUICKSTART), "--out", str(tmp_path / "o"), "--check", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "quickstart.expected.yaml" in p.stdout


def _finished_run(d: Path, dpo_gap: float) -> None:
    """A run whose stages are all complete (so ``starpo run`` trains nothing) with an
    evaluation written by hand."""
    for name in ("sft", "dpo", "eval"):
        (d / name).mkdir(parents=True)
        (d / name / "stage.json").write_text(json.dumps({"complete": True}))
    summary = {n: {"n": 10, "mean_score": s, "kl_vs_sft": k}
               for n, s, k in (("sft", 0.0, 0.0), ("dpo", dpo_gap, 0.1))}
    (d / "eval" / "summary.json").write_text(json.dumps(summary))
    (d / "eval" / "gaps.json").write_text(json.dumps([
        {"model": "dpo", "baseline": "sft", "n": 10, "gap": dpo_gap,
         "gap_ci": [dpo_gap - 0.05, dpo_gap + 0.05]}]))


def test_check_says_as_expected_or_exits_1_naming_what_differs(tmp_path):
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [
        {"type": "sft", "data": {"sources": [{"path": "world:sft"}]}},
        {"type": "dpo", "data": {"sources": [{"path": "world:preference"}]}},
        {"type": "eval"}]}))
    (tmp_path / "mini.expected.yaml").write_text(yaml.safe_dump({
        "prompts": 10, "gaps": [{"model": "dpo", "baseline": "sft", "gap": [0.05, 0.3],
                                 "interval_above": 0}],
        "models": {"dpo": {"kl_vs_sft": [0.01, 0.5]}}}))
    _finished_run(tmp_path / "good", 0.2)
    p = _cli("run", str(recipe), "--out", str(tmp_path / "good"), "--check", "--no-report")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.rstrip().endswith("as expected")
    _finished_run(tmp_path / "bad", 0.02)
    p = _cli("run", str(recipe), "--out", str(tmp_path / "bad"), "--check", "--no-report",
             "seed=3")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "DIFFERS dpo − sft: +0.020 [−0.030, +0.070]; expected gap +0.050 to +0.300, " \
           "interval above 0.000" in p.stdout
    assert "note: the ranges are the recipe's as shipped; this run also overrides seed" \
        in p.stdout
    assert p.stdout.rstrip().endswith("1 of 3 checks differ from the expected results")


def test_a_sweep_with_a_failed_trial_exits_1(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from starpo.cli import app
    from starpo.run import sweep as S
    from sweep_helpers import write_sweep
    path = write_sweep(tmp_path)
    monkeypatch.setattr(S, "run_sweep", lambda plan, **kw: [
        {"id": t.id, "status": "failed" if i == 1 else "ok"} for i, (t, _) in
        enumerate(plan.trials)])
    monkeypatch.setattr(S, "finalize", lambda out, **kw: None)
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "s"), "-q"])
    assert res.exit_code == 1, res.output
    assert "3 ok, 1 failed of 4 trials" in res.output
    monkeypatch.setattr(S, "run_sweep", lambda plan, **kw: [
        {"id": t.id, "status": "ok"} for t, _ in plan.trials])
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "s"), "-q"])
    assert res.exit_code == 0, res.output
