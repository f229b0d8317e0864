"""Bad rows that explain the way out, and skipped rows written to the stage's bad_rows.jsonl.

Real HH-RLHF transcripts, recombined the way hub data goes wrong (an empty answer, chosen
and rejected histories that differ)."""

from __future__ import annotations

import json

import pytest

from conftest import realdata
from starpo.recipe import DataSpec, SourceSpec, recipe_from_dict
from starpo.data.sources import load_mixture, load_source
from starpo.errors import BadRows, DataError, bad_rows_to


def _hh_with_bad_rows(tmp_path):
    raw = [json.loads(x) for x in realdata("hh_rlhf.jsonl").read_text().splitlines()]
    empty = dict(raw[4], chosen=raw[4]["chosen"].rsplit("\n\nAssistant:", 1)[0]
                 + "\n\nAssistant:")
    mismatched = {"chosen": raw[5]["chosen"], "rejected": raw[6]["rejected"]}
    rows = raw[:4] + [empty] + raw[7:10] + [mismatched] + raw[10:12]
    p = tmp_path / "hh.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p, {4: ("chosen", empty), 8: ("rejected", mismatched)}


def test_error_names_file_row_field_and_how_to_go_on(tmp_path):
    p, bad = _hh_with_bad_rows(tmp_path)
    with pytest.raises(DataError) as e:
        load_source(SourceSpec(path=str(p)), "preference")
    msg = str(e.value)
    assert msg.startswith(f"{p}, row 4, field 'chosen': empty response")
    assert "data.on_bad_rows: skip" in msg and "\n" not in msg
    # inside a pipeline stage the line names the stage's override and the file
    with bad_rows_to(tmp_path / "dpo" / "bad_rows.jsonl", stage="dpo"):
        with pytest.raises(DataError) as e:
            load_source(SourceSpec(path=str(p)), "preference")
    assert "stages.dpo.data.on_bad_rows=skip" in str(e.value)
    assert str(tmp_path / "dpo" / "bad_rows.jsonl") in str(e.value)
    assert not (tmp_path / "dpo" / "bad_rows.jsonl").exists()   # nothing skipped


def test_skipped_rows_are_counted_and_written(tmp_path):
    p, bad = _hh_with_bad_rows(tmp_path)
    out = tmp_path / "stage" / "bad_rows.jsonl"
    lines = []
    data = DataSpec(sources=[SourceSpec(path=str(p))], on_bad_rows="skip")
    with bad_rows_to(out, stage="dpo"):
        rows = load_mixture(data, "preference", log=lines.append)
    assert len(rows) == 9
    assert any("2 bad rows skipped" in x and str(out) in x for x in lines)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in recs] == [(k, f) for k, (f, _) in bad.items()]
    for r in recs:
        assert r["source"] == str(p) and r["phase"] == "read"
        assert r["data"] == bad[r["row"]][1]            # the row as read, nothing lost
        assert r["reason"] and r["error"].startswith(f"{p}, row {r['row']}")
    # preparing again starts the file afresh (no duplicates from an earlier preparation)
    with bad_rows_to(out, stage="dpo"):
        load_mixture(data, "preference", log=lines.append)
    assert len(out.read_text().splitlines()) == 2


def test_tokenization_bad_rows(tmp_path):
    err = DataError("conversation has no trainable (assistant) token", source="f.jsonl",
                    row=3, field="messages")
    with pytest.raises(DataError, match=r"row 3.*data.on_bad_rows: skip"):
        BadRows("error", print).handle(err)
    out = tmp_path / "bad_rows.jsonl"
    logged = []
    with bad_rows_to(out, stage="sft"):
        b = BadRows("skip", logged.append, "conversations")
        b.handle(DataError("x", source="f.jsonl", row=1, field="messages"))
        b.report()
    assert json.loads(out.read_text())["phase"] == "tokenize"
    assert str(out) in logged[-1] and "skipped 1 conversations" in logged[-1]


def _dpo_recipe(path, **data):
    return recipe_from_dict({
        "name": "bad", "model": {"name_or_path": "tiny", "tiny": {
            "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 400}},
        "stages": [{"type": "dpo", "max_length": 256, "max_prompt_length": 128,
                    "data": {"sources": [{"path": str(path)}], **data},
                    "train": {"max_steps": 1, "batch_size": 2, "warmup_ratio": 0.0}}]})


def test_pipeline_stops_with_the_way_out_then_skips_and_writes(tmp_path, one_thread):
    from starpo.run import pipeline
    p, bad = _hh_with_bad_rows(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(DataError) as e:
        pipeline.run(_dpo_recipe(p), out, log=lambda m: None, progress=False, report=False)
    assert "stages.dpo.data.on_bad_rows=skip" in str(e.value) and "\n" not in str(e.value)
    logs = []
    pipeline.run(_dpo_recipe(p, on_bad_rows="skip"), out, log=logs.append, progress=False,
                 report=False)
    assert (out / "dpo" / "stage.json").is_file()
    recs = [json.loads(x) for x in (out / "dpo" / "bad_rows.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in recs) == sorted(bad)
    assert any("2 bad rows skipped" in m for m in logs)
