"""How the reproduction study runs its pieces: with the public pipeline and sweep API
only, from the recipes in ``recipes/reproduction/``.

Layout of ``OUT`` (every directory below is a normal run or sweep directory, so
``starpo report`` and ``starpo sweep FILE --dry-run`` work on each)::

    OUT/sft/seed<s>/             the seed's SFT model (packing + masking): a run of
                                 pipeline.yaml's sft stage, trained once per seed
    OUT/<study>/seed<s>/         the study's sweep for that seed: sweep.yaml (the sweep
                                 file that ran, with the seed, the scale's overrides and
                                 absolute paths written in), trials/, trials.jsonl,
                                 analysis.json, report.html
    OUT/cache/                   reference log-probs and evaluation samples shared by
                                 every sweep (keyed by content: the SFT model's samples
                                 and reference pass are computed once per seed)
    OUT/results.json             what the document is written from

Sharing the SFT model: a sweep's shared run (and any trial whose recipe trains the same
SFT stage, as study 1's packing + masking cell does) gets the seed's finished ``sft/``
stage directory as hard links before it runs; the pipeline skips a finished stage, so it
is not trained again. The copy is made only when the recipe's seed, model, world and
``sft`` stage are exactly the seed's.

Resuming: rerunning skips the finished SFT runs and, through the sweeps, every finished
trial; an interrupted trial resumes from its checkpoints.

Changed recipes: a finished run is reused only while it is what the recipes ask for now.
An SFT run, or a seed's study sweep with a trial or shared run, whose ``recipe.yaml``
differs from the one the current recipes resolve to (``recipes/reproduction/`` was
edited since it ran) is moved to ``OUT/stale/<time>/`` (kept, never deleted) and run
again, with one line saying so.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from starpo import fileio
from starpo.errors import StarpoError
from starpo.metrics.analysis import latest_records
from starpo.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict
from starpo.run import pipeline
from starpo.run import sweep as S

RECIPES = Path(__file__).resolve().parents[4] / "recipes" / "reproduction"
PIPELINE = "pipeline.yaml"

# the micro model of --mini (the tests' size: a stage takes about a second)
MICRO = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 400}


@dataclass(frozen=True)
class Scale:
    """How big the study is: its seeds, overrides applied to every run, and replacement
    grids (``methods:``) per study sweep file."""

    name: str
    seeds: tuple[int, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict] = field(default_factory=dict)


FULL = Scale("full", (0, 1, 2))

# --mini: every study on the micro model, one seed, a few steps, a tiny grid (< 1 min)
MINI = Scale("mini", (0,), overrides={
    "model.tiny": MICRO,
    "stages.sft.data.sources.0.n": 120, "stages.sft.train.max_steps": 3,
    "stages.sft.train.save_every": None, "stages.sft.train.log_every": 1,
    "stages.dpo.data.sources.0.n": 48, "stages.dpo.train.max_steps": 3,
    "stages.dpo.train.batch_size": 4, "stages.dpo.train.log_every": 1,
    "stages.dpo.train.save_every": None,
    "stages.reward.data.sources.0.n": 48, "stages.reward.train.max_steps": 2,
    "stages.reward.train.batch_size": 4,
    "stages.offline.data.sources.0.n": 48,
    "stages.online.rounds": 2, "stages.online.prompts_per_round": 6,
    "stages.online.n_samples": 2, "stages.online.data.sources.0.n": 12,
    "stages.online.generation": {"temperature": 0.8, "max_new_tokens": 10, "batch_size": 16},
    "stages.online.train.batch_size": 4, "stages.online.train.epochs": 1,
    "stages.eval.data.sources.0.n": 8,
    "stages.eval.generation": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 10,
                               "batch_size": 16},
    "stages.eval.bootstrap": 50,
}, methods={
    "sft_variants": {"dpo": {"stages.sft.packing.mode": ["pack", "pad"],
                             "stages.sft.packing.loss_masking": [True, False]}},
    "dpo_scaling": {"dpo": {"stages.dpo.data.sources.0.n": [24, 48],
                            "stages.dpo.train.max_steps": [2, 4]}},
    "guide": {"dpo": {"stages.dpo.beta": [0.1, 0.5]},
              "ln_dpo": {"stages.dpo.beta": [1.0, 5.0]},
              "simpo": {"stages.dpo.beta": [1.0, 2.5]}},
})


@dataclass
class Context:
    """Where a reproduction writes, at which scale, with how many parallel jobs."""

    out: Path
    scale: Scale = FULL
    jobs: int = 1
    log: Callable[[str], None] = print
    recipes: Path = RECIPES

    def __post_init__(self):
        self.out = Path(self.out).resolve()
        # names this invocation's OUT/stale/<started>/ (runs set aside, see the docstring)
        self.started = time.strftime("%Y%m%dT%H%M%S")

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.scale.seeds

    @property
    def cache_dir(self) -> Path:
        return self.out / "cache"

    def sft_dir(self, seed: int) -> Path:
        return self.out / "sft" / f"seed{seed}"

    def study_dir(self, study: str, seed: int) -> Path:
        return self.out / study / f"seed{seed}"

    def overrides(self, seed: int) -> dict[str, Any]:
        """What every run of a seed gets on top of its recipe or sweep file."""
        return {"seed": seed, **self.scale.overrides}


def _cli(overrides: dict[str, Any]) -> list[str]:
    """``{key: value}`` as the ``key=value`` strings of the command line."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def pipeline_recipe(ctx: Context, seed: int, extra: dict[str, Any] | None = None) -> Recipe:
    """recipes/reproduction/pipeline.yaml with the seed's overrides (and ``extra``)."""
    return load_recipe(ctx.recipes / PIPELINE, _cli({**ctx.overrides(seed), **(extra or {})}))


def _only_stages(recipe: Recipe, names: list[str]) -> Recipe:
    tree = recipe.model_dump(mode="json")
    tree["stages"] = [st for st in tree["stages"] if st["name"] in names]
    return recipe_from_dict(tree, origin=f"{recipe.name} ({', '.join(names)})")


# =========================================================================== the SFT model


def sft_recipe(ctx: Context, seed: int) -> Recipe:
    """The seed's SFT run: pipeline.yaml's sft stage alone."""
    return _only_stages(pipeline_recipe(ctx, seed), ["sft"])


def _sft_done(run_dir: Path) -> bool:
    return (run_dir / "sft" / "stage.json").is_file()


def _ran_other_recipe(run_dir: Path, recipe: Recipe) -> bool:
    """Whether ``run_dir`` holds a run of a recipe other than ``recipe`` (no run: False)."""
    f = run_dir / "recipe.yaml"
    return f.is_file() and f.read_text() != dump_recipe(recipe)


def set_aside(ctx: Context, d: Path, why: str) -> Path:
    """Move ``d`` under ``OUT/stale/<time>/`` (same relative path) and say so."""
    dst = ctx.out / "stale" / ctx.started / d.relative_to(ctx.out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(d), str(dst))
    ctx.log(f"{why}: its recipe changed since it ran; moved to {dst}, running it again")
    return dst


def train_sft_models(ctx: Context) -> None:
    """Train the SFT model of every seed that has none (``jobs`` at a time, each in a
    child process when ``jobs > 1``); a seed's run of another SFT recipe is set aside."""
    for s in ctx.seeds:
        if _ran_other_recipe(ctx.sft_dir(s), sft_recipe(ctx, s)):
            set_aside(ctx, ctx.sft_dir(s), f"[sft] seed {s}")
    todo = [s for s in ctx.seeds if not _sft_done(ctx.sft_dir(s))]
    for s in ctx.seeds:
        if s not in todo:
            ctx.log(f"[sft] seed {s}: complete, skipped ({ctx.sft_dir(s)})")
    if not todo:
        return

    def one(seed: int, env: dict[str, str] | None) -> None:
        rec, d = sft_recipe(ctx, seed), ctx.sft_dir(seed)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if env is None:
            pipeline.run(rec, d, log=lambda m: None, progress=False, report=True)
        else:
            fileio.write_text(d / "recipe.yaml", dump_recipe(rec))
            S.run_trial_subprocess(rec, d, env=env)
        ctx.log(f"[sft] seed {seed}: trained in {time.time() - t0:.0f} s ({d})")

    if ctx.jobs <= 1:
        for s in todo:
            one(s, None)
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ctx.jobs)))
    with ThreadPoolExecutor(max_workers=ctx.jobs) as pool:
        for f in [pool.submit(one, s, env) for s in todo]:
            f.result()


def _same_sft(a: Recipe, b: Recipe) -> bool:
    """Whether two recipes train the same SFT model (seed, model, world, sft stage)."""
    names_b = {s.name for s in b.stages}
    if "sft" not in names_b:
        return False
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    return all(da.get(k) == db.get(k) for k in ("seed", "model", "world")) and \
        a.stage("sft").model_dump(mode="json") == b.stage("sft").model_dump(mode="json")


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of the stage directory ``src`` (files hard-linked when the
    file system allows; resumable checkpoints left out), renamed into place at the end."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    fileio.atomic_dir(dst, lambda tmp: shutil.copytree(
        src, tmp, copy_function=link, dirs_exist_ok=True, symlinks=True,
        ignore=shutil.ignore_patterns("checkpoints")))


def reuse_sft(ctx: Context, seed: int, run_dir: Path, recipe: Recipe) -> bool:
    """Give ``run_dir`` the seed's finished SFT stage when ``recipe`` trains the same one
    (see the module docstring); True when it has it afterwards."""
    if _sft_done(run_dir):
        return True
    src = ctx.sft_dir(seed)
    if not _sft_done(src) or not _same_sft(load_recipe(src / "recipe.yaml"), recipe):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    _link_tree(src / "sft", run_dir / "sft")
    return True


# =========================================================================== study sweeps


def study_plan(ctx: Context, study: str, seed: int,
               overrides: dict[str, Any] | None = None) -> S.SweepPlan:
    """The sweep ``recipes/reproduction/<study>.yaml`` for one seed, written as
    ``OUT/<study>/seed<s>/sweep.yaml`` (what runs, rerunnable with ``starpo sweep``):
    its recipe and the cache directory as absolute paths, the seed's and the scale's
    overrides, ``overrides``, and the scale's grid for the study when it has one."""
    spec = yaml.safe_load((ctx.recipes / f"{study}.yaml").read_text())
    spec["name"] = f"{spec.get('name') or study}-seed{seed}"
    spec["recipe"] = str((ctx.recipes / spec["recipe"]).resolve())
    spec["overrides"] = {**(spec.get("overrides") or {}), **ctx.overrides(seed),
                         **(overrides or {})}
    if study in ctx.scale.methods:
        spec["methods"] = copy.deepcopy(ctx.scale.methods[study])
    spec["cache_dir"] = str(ctx.cache_dir)
    d = ctx.study_dir(study, seed)
    d.mkdir(parents=True, exist_ok=True)
    fileio.write_text(d / "sweep.yaml", yaml.safe_dump(spec, sort_keys=False))
    return S.make_plan(S.load_sweep(d / "sweep.yaml"), d)


def run_study(ctx: Context, study: str, overrides: dict[str, Any] | None = None) -> None:
    """Run a study's sweep for every seed (finished trials are skipped), sharing the
    seed's SFT model, then write each sweep's analysis and report."""
    for seed in ctx.seeds:
        plan = study_plan(ctx, study, seed, overrides)
        runs = [(plan.shared_dir, plan.shared)] if plan.shared is not None else []
        runs += [(S.trial_dir(plan.out, t.id), rec) for t, rec in plan.trials]
        if any(_ran_other_recipe(d, rec) for d, rec in runs):
            set_aside(ctx, plan.out, f"[{study}] seed {seed}")
            plan = study_plan(ctx, study, seed, overrides)
        if plan.shared is not None:
            reuse_sft(ctx, seed, plan.shared_dir, plan.shared)
        for t, rec in plan.trials:
            reuse_sft(ctx, seed, S.trial_dir(plan.out, t.id), rec)
        ctx.log(f"[{study}] seed {seed}: {len(plan.trials)} trials → {plan.out}")
        recs = S.run_sweep(plan, jobs=ctx.jobs, log=lambda m: ctx.log(f"  {m}"))
        failed = [r for r in recs if r.get("status") != "ok"]
        S.finalize(plan.out, log=lambda m: None)
        if failed:
            ctx.log(f"[{study}] seed {seed}: {len(failed)} trial(s) failed, e.g. "
                    f"{failed[0]['id']}: {failed[0].get('error')}")


# =========================================================================== reading results


def trial_records(ctx: Context, study: str, seed: int) -> list[dict]:
    """The latest record of every trial of the study's current sweep (none: ``[]``)."""
    d = ctx.study_dir(study, seed)
    info = read_json(d / "sweep.json") or {}
    ids = [t["id"] for t in info.get("trials", [])] or None
    return latest_records(fileio.read_jsonl(d / "trials.jsonl"), ids)


def seeds_with_results(ctx: Context, study: str) -> list[int]:
    """The seeds of which at least one trial of the study finished: what its figures are
    means over (a seed still running or never run is not named in the document)."""
    return [seed for seed in ctx.seeds
            if any(r.get("status") == "ok" for r in trial_records(ctx, study, seed))]


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def eval_summary(run_dir: Path, stage: str = "eval") -> dict:
    """``run_dir/<stage>/summary.json`` (model → metrics with ``<metric>_ci``), or {}."""
    s = read_json(Path(run_dir) / stage / "summary.json")
    return s if isinstance(s, dict) else {}


def record_dir(ctx: Context, study: str, seed: int, rec: dict) -> Path:
    """A trial's run directory."""
    return ctx.study_dir(study, seed) / rec["dir"]


def metrics_log(run_dir: Path, stage: str) -> list[dict]:
    """A stage's ``metrics.jsonl`` (training steps)."""
    return fileio.read_jsonl(Path(run_dir) / stage / "metrics.jsonl")


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def require_recipes(ctx: Context) -> None:
    if not (ctx.recipes / PIPELINE).is_file():
        raise StarpoError(f"{ctx.recipes / PIPELINE}: the reproduction recipes are not "
                          f"there; run from a starpo source checkout (recipes/reproduction/)")
