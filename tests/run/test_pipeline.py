"""End to end on a microscopic recipe: the CLI, the run directory, skip/resume, the DPO
stage with every loss, the reference cache, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import micro_recipe, quiet
import torch
import yaml

from starpo.run import pipeline
from starpo.recipe import recipe_from_dict



_recipe = micro_recipe


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    pipeline.run(recipe_from_dict(_recipe()), out, only=["sft"], log=quiet, progress=False,
                 report=False)
    return out


def _copy_sft(src: Path, dst: Path):
    import shutil
    for part in ("base", "sft"):
        shutil.copytree(src / part, dst / part)


def test_sft_stage_writes_the_contracted_run_directory(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = sft_run / "sft"
    assert (d / "stage.json").is_file() and (d / "metrics.jsonl").is_file()
    m = AutoModelForCausalLM.from_pretrained(d / "model")
    tok = AutoTokenizer.from_pretrained(d / "model")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert m.config.vocab_size >= len(tok)
    recs = [json.loads(l) for l in (d / "metrics.jsonl").open()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    summary = json.loads((d / "stage.json").read_text())
    # sdpa + packing: each micro-batch is one row with attention per document, no padding
    assert summary["padding_fraction"] == 0.0 and summary["steps"] == 3


@pytest.mark.parametrize("loss", ["dpo", "ln_dpo", "simpo", "ipo"])
def test_every_preference_loss_trains(sft_run, tmp_path, loss):
    _copy_sft(sft_run, tmp_path)
    before = {k: v.clone() for k, v in _load(tmp_path / "sft" / "model").items()}
    pipeline.run(recipe_from_dict(_recipe(loss=loss)), tmp_path, log=quiet, progress=False,
                 report=False)
    d = tmp_path / "dpo"
    rec = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
    for k in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
              "logp_chosen", "logp_rejected", "token_prob_margin"):
        assert k in rec and rec[k] == rec[k], k    # present and not NaN
    after = _load(d / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((d / "stage.json").read_text())
    assert "eval_after" in summary and summary["eval_pairs"] > 0
    if loss == "simpo":
        assert not (tmp_path / "refcache").exists()   # reference-free: no cache


def _load(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


def test_reference_cache_hits_on_rerun_and_misses_on_change(sft_run, tmp_path):
    _copy_sft(sft_run, tmp_path)
    logs = []
    pipeline.run(recipe_from_dict(_recipe()), tmp_path, log=logs.append, progress=False,
                 report=False)
    assert any("computing" in l for l in logs if "reference log-probs" in l)
    files = sorted((tmp_path / "refcache").glob("ref-*.safetensors"))
    assert len(files) == 1
    # a second run of the stage (e.g. another sweep trial): cache hit, no recomputation
    import shutil
    shutil.rmtree(tmp_path / "dpo")
    logs.clear()
    pipeline.run(recipe_from_dict(_recipe(beta=0.2)), tmp_path, log=logs.append,
                 progress=False, report=False)
    assert any("cache hit" in l for l in logs)
    # different data → miss, a second file
    shutil.rmtree(tmp_path / "dpo")
    r = _recipe()
    r["stages"][1]["data"]["sources"][0]["n"] = 50
    pipeline.run(recipe_from_dict(r), tmp_path, log=quiet, progress=False, report=False)
    assert len(list((tmp_path / "refcache").glob("ref-*.safetensors"))) == 2
    # different reference weights → miss
    shutil.rmtree(tmp_path / "dpo")
    r = _recipe(reference="base")
    pipeline.run(recipe_from_dict(r), tmp_path, log=quiet, progress=False, report=False)
    assert len(list((tmp_path / "refcache").glob("ref-*.safetensors"))) == 3


def test_runs_share_a_reference_cache_directory(sft_run, tmp_path):
    """Two run directories (two sweep trials) with one refcache_dir: the second hits."""
    shared = tmp_path / "shared-refcache"
    logs = []
    for name in ("a", "b"):
        _copy_sft(sft_run, tmp_path / name)
        logs.clear()
        pipeline.run(recipe_from_dict(_recipe()), tmp_path / name, log=logs.append,
                     progress=False, report=False, refcache_dir=shared)
        assert not (tmp_path / name / "refcache").exists()
    assert any("cache hit" in l for l in logs)
    assert len(list(shared.glob("ref-*.safetensors"))) == 1


def test_cached_reference_equals_a_fresh_forward(sft_run, tmp_path):
    from safetensors.torch import load_file

    from starpo.model import loading
    from starpo.data.sources import load_mixture, split_eval
    from starpo.model.logprobs import plain_sequence_logprobs
    from starpo.data.prefbatch import collate_padded
    from starpo.stages.preference import tokenize_pairs
    _copy_sft(sft_run, tmp_path)
    rec = recipe_from_dict(_recipe())
    pipeline.run(rec, tmp_path, log=quiet, progress=False, report=False)
    st = rec.stage("dpo")
    path = str(tmp_path / "sft" / "model")
    tok = loading.load_tokenizer(path)
    rows = load_mixture(st.data, "preference", seed=0)
    tr, ev = split_eval(rows, st.data.eval_fraction, 0)
    from starpo.train.refcache import pair_key
    train = tokenize_pairs(tok, tr, st, on_bad_rows="error", progress=False, log=quiet)[0]
    pairs = train + tokenize_pairs(tok, ev, st, on_bad_rows="error", progress=False,
                                   log=quiet)[0]
    entry = next((tmp_path / "refcache").glob("ref-*.safetensors"))
    cached = load_file(str(entry))
    # the entry holds the pairs max_steps reaches plus every held-out pair, in the order
    # its sidecar lists their content hashes
    hashes = json.loads(entry.with_name(entry.stem + ".pairs.json").read_text())["pairs"]
    where = {pair_key(p): i for i, p in enumerate(pairs)}
    idx = [where[h] for h in hashes]
    assert set(range(len(train), len(pairs))) <= set(idx) and len(idx) < len(pairs)
    assert len(idx) == len(pairs) - len(train) + 3 * 4     # 3 steps of 4 pairs
    model = loading.load_model(path, for_training=False)
    with torch.no_grad():
        lp, _, _ = plain_sequence_logprobs(model, collate_padded([pairs[i].as_dict()
                                                                  for i in idx],
                                                                 tok.pad_token_id))
    torch.testing.assert_close(cached["chosen"], lp[0::2].float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(cached["rejected"], lp[1::2].float(), atol=1e-4, rtol=0)


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "starpo.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_cli_runs_skips_finished_stages_and_dry_runs(tmp_path):
    recipe = tmp_path / "micro.yaml"
    r = _recipe()
    r["stages"] = r["stages"][:1]
    recipe.write_text(yaml.safe_dump(r))
    out = tmp_path / "out"
    p = _cli("run", str(recipe), "--out", str(out), "-q", "--no-report")
    assert p.returncode == 0, p.stderr
    assert (out / "sft" / "model" / "model.safetensors").is_file()
    p = _cli("run", str(recipe), "--out", str(out), "-q", "--no-report")
    assert p.returncode == 0 and "complete, skipped" in p.stdout
    p = _cli("run", str(recipe), "--out", str(out), "--dry-run", "--show-recipe",
             "stages.sft.train.lr=0.5")
    assert p.returncode == 0 and "lr: 0.5" in p.stdout and "complete" in p.stdout


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    r = _recipe()
    r["stages"][0]["train"]["lrr"] = 1
    recipe.write_text(yaml.safe_dump(r))
    p = _cli("run", str(recipe), "--out", str(tmp_path / "o"))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert "stages.sft.train.lrr: unknown key" in p.stderr and "Traceback" not in p.stderr
    # a malformed data row names file, row and field
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    r = _recipe()
    r["stages"] = r["stages"][:1]
    r["stages"][0]["data"]["sources"] = [{"path": str(data)}]
    recipe.write_text(yaml.safe_dump(r))
    p = _cli("run", str(recipe), "--out", str(tmp_path / "o2"), "-q")
    assert p.returncode == 2, p.stderr
    assert "d.jsonl" in p.stderr and "row 1" in p.stderr and "content" in p.stderr
