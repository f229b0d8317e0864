"""logging.trackers: TensorBoard, wandb (offline) and MLflow (local file store) through
accelerate's tracker API, one run per stage or one per pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starpo.run import pipeline
from starpo.train import trackers
from starpo.recipe import dump_recipe, recipe_from_dict
from starpo.errors import RecipeError, StarpoError

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}
FAST = {"max_steps": 2, "batch_size": 4, "log_every": 1, "warmup_ratio": 0.0}


def _recipe(logging=None, name="trk"):
    tree = {"name": name, "model": {"name_or_path": "tiny", "tiny": TINY},
            "stages": [
                {"type": "sft", "data": {"sources": [{"path": "world:sft", "n": 40}]},
                 "packing": {"max_length": 128}, "train": FAST},
                {"type": "dpo", "beta": 0.3, "max_length": 128, "max_prompt_length": 64,
                 "data": {"sources": [{"path": "world:preference", "n": 16}]}, "train": FAST}]}
    if logging is not None:
        tree["logging"] = logging
    return recipe_from_dict(tree)


def _run(rec, out):
    pipeline.run(rec, out, log=lambda m: None, progress=False, report=False)


def _scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_recipe_key_validation_and_dump():
    rec = _recipe()
    assert rec.logging.trackers == ["tensorboard"] and rec.logging.run_per == "stage"
    assert "logging" not in dump_recipe(rec)          # default: hashes as before
    rec = _recipe({"trackers": ["wandb", "mlflow"], "run_per": "pipeline"})
    assert "logging" in dump_recipe(rec)
    with pytest.raises(RecipeError, match=r"logging\.trackers\.0"):
        _recipe({"trackers": ["neptune"]})
    with pytest.raises(RecipeError, match="listed twice: wandb"):
        _recipe({"trackers": ["wandb", "wandb"]})
    with pytest.raises(RecipeError, match=r"logging\.run_per"):
        _recipe({"run_per": "step"})


def test_a_missing_tracker_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(StarpoError) as e:
        _run(_recipe({"trackers": ["tensorboard", "wandb"]}), tmp_path / "run")
    assert str(e.value) == ("logging.trackers: wandb is not installed; "
                            "pip install 'starpo[wandb]'")
    assert not (tmp_path / "run" / "sft").exists()    # failed before any stage ran


def test_tensorboard_by_default_where_it_always_was(tmp_path, one_thread):
    out = tmp_path / "run"
    _run(_recipe(), out)
    for stage in ("sft", "dpo"):
        sc = _scalars(out / stage / "tensorboard")
        want = [(r["step"], r["loss"]) for r in _jsonl(out / stage / "metrics.jsonl")]
        assert [(s, pytest.approx(v)) for s, v in sc["loss"]] == want
        assert "lr" in sc and "tokens_per_s" in sc


def test_no_trackers_means_metrics_jsonl_only(tmp_path, one_thread):
    out = tmp_path / "run"
    _run(_recipe({"trackers": []}), out)
    assert (out / "sft" / "metrics.jsonl").is_file() and not (out / "sft" / "tensorboard").exists()


def _wandb_runs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "wandb").glob("offline-run-*") if p.is_dir())


def _wandb_run(run_dir: Path) -> dict:
    """What an offline wandb run wrote: its run record, config and history rows, read from
    ``run-<id>.wandb`` (LevelDB-log framing of protobuf records: 7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header ``crc32, length, kind``)."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    buf = next(run_dir.glob("run-*.wandb")).read_bytes()
    chunks, part, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:                     # block trailer: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        data, pos = buf[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(data)
        elif kind == 2:
            part = data
        elif kind == 3:
            part += data
        elif kind == 4:
            chunks.append(part + data)
    out = {"history": [], "config": {}, "run": None}
    key = lambda item: item.key or "/".join(item.nested_key)
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in r.history.item
                                   if not key(i).startswith("_")})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "run":
            out["run"] = r.run
    return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)   # starpo sets it itself


def _mlflow_runs(out: Path, experiment: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, {r.info.run_name: r for r in runs}


def test_one_run_per_stage(tmp_path, offline, one_thread):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    _run(_recipe({"trackers": ["tensorboard", "wandb", "mlflow"]}), out)
    metrics = {s: _jsonl(out / s / "metrics.jsonl") for s in ("sft", "dpo")}
    # MLflow: one finished run per stage, the recipe as parameters, every logged step
    client, runs = _mlflow_runs(out, "trk")
    assert set(runs) == {"trk/sft", "trk/dpo"}
    for stage, run in ((s, runs[f"trk/{s}"]) for s in ("sft", "dpo")):
        assert run.info.status == "FINISHED"
        assert run.data.tags["starpo.stage"] == stage
        assert run.data.params["stages.dpo.beta"] == "0.3"
        assert run.data.params["stages.sft.train.max_steps"] == "2"
        hist = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, pytest.approx(m.value)) for m in hist] == \
            [(r["step"], r["loss"]) for r in metrics[stage]]
    assert "reward_accuracy" in runs["trk/dpo"].data.metrics
    # wandb (offline): one run per stage, every logged step, the resolved recipe as config
    wb = [_wandb_run(d) for d in _wandb_runs(out)]
    assert sorted(w["run"].display_name for w in wb) == ["trk/dpo", "trk/sft"]
    for w in wb:
        stage = w["run"].display_name.split("/")[1]
        assert w["run"].project == "trk" and w["run"].run_group == "trk"
        assert w["run"].job_type == stage
        assert [(h["step"], pytest.approx(h["loss"])) for h in w["history"]] == \
            [(r["step"], r["loss"]) for r in metrics[stage]]
        assert w["config"]["stages"][1]["beta"] == 0.3
        assert w["config"]["name"] == "trk"
    # TensorBoard still per stage directory
    assert "loss" in _scalars(out / "dpo" / "tensorboard")


def test_one_run_per_pipeline_with_stage_prefixes(tmp_path, offline, one_thread):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    _run(_recipe({"trackers": ["tensorboard", "wandb", "mlflow"], "run_per": "pipeline",
                  "project": "proj"}), out)
    client, runs = _mlflow_runs(out, "proj")
    assert set(runs) == {"trk"}
    run = runs["trk"]
    for stage in ("sft", "dpo"):
        want = [(r["step"], r["loss"]) for r in _jsonl(out / stage / "metrics.jsonl")]
        hist = client.get_metric_history(run.info.run_id, f"{stage}/loss")
        assert [(m.step, pytest.approx(m.value)) for m in hist] == want
    wb = [_wandb_run(d) for d in _wandb_runs(out)]
    assert len(wb) == 1 and wb[0]["run"].display_name == "trk"
    hist = wb[0]["history"]
    for stage in ("sft", "dpo"):
        # each stage's steps on its own step key (wandb wants one increasing step per run)
        assert [(h[f"{stage}/step"], pytest.approx(h[f"{stage}/loss"])) for h in hist
                if f"{stage}/loss" in h] == \
            [(r["step"], r["loss"]) for r in _jsonl(out / stage / "metrics.jsonl")]
    sc = _scalars(out / "tensorboard")
    assert {"sft/loss", "dpo/loss"} <= set(sc)
    assert not (out / "sft" / "tensorboard").exists()


def test_a_failed_stage_ends_its_runs_as_failed(tmp_path, offline, monkeypatch, one_thread):
    pytest.importorskip("mlflow")
    from starpo.stages import dpo as dpo_stage
    out = tmp_path / "run"

    rec = _recipe({"trackers": ["mlflow"]})
    _run(recipe_from_dict({**rec.model_dump(mode="json"),
                           "stages": [rec.model_dump(mode="json")["stages"][0]]}), out)
    monkeypatch.setattr(dpo_stage, "train_preference",
                        lambda ctx, stage, tok, model, *a, **k: _log_then_fail(out))
    with pytest.raises(RuntimeError, match="boom"):
        _run(rec, out)
    _, runs = _mlflow_runs(out, "trk")
    assert runs["trk/sft"].info.status == "FINISHED"
    assert runs["trk/dpo"].info.status == "FAILED"


def _log_then_fail(out: Path):
    from starpo.train.metrics_log import MetricsLog
    log = MetricsLog(out / "dpo")
    log.write({"step": 1, "loss": 0.5})
    raise RuntimeError("boom")


def test_flatten_keys_stages_by_name():
    flat = trackers.flatten(_recipe().model_dump(mode="json"))
    assert flat["stages.dpo.beta"] == 0.3 and flat["model.tiny.hidden_size"] == 32
    assert flat["stages.dpo.train.adam_betas"] == "[0.9, 0.95]"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())
