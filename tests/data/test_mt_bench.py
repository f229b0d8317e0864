"""The MT-Bench prompt source: FastChat's question.jsonl schema (question_id, category,
turns, optional reference), first turn as the prompt, the category kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starpo.data.formats import detect_format
from starpo.data.sources import load_source
from starpo.errors import DataError
from starpo.recipe import SourceSpec

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mt_bench_question.jsonl"


def test_first_turn_is_the_prompt_and_the_category_is_kept():
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    rows = load_source(SourceSpec(path=str(FIXTURE)), "prompt")
    assert len(rows) == len(raw)
    for r, q in zip(rows, raw):
        assert r["prompt"] == [{"role": "user", "content": q["turns"][0]}]
        assert r["category"] == q["category"]
        assert r["id"] == str(q["question_id"])
        assert r["chosen"] is None          # MT-Bench's references are not chat answers


def test_detected_from_the_columns_only_for_prompt_stages():
    cols = {"question_id", "category", "turns"}
    assert detect_format(cols, "prompt") == "mt_bench"
    assert detect_format(cols | {"reference"}, "prompt") == "mt_bench"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(cols, "preference")


@pytest.mark.parametrize("row,field", [
    ({"question_id": 1, "category": "math", "turns": []}, "turns"),
    ({"question_id": 1, "category": "math", "turns": ["  "]}, "turns[0]"),
    ({"question_id": 1, "category": "math", "turns": [3]}, "turns[0]"),
    ({"question_id": 1, "turns": ["hi"]}, "category"),
])
def test_bad_rows_name_the_field(row, field, tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question_id": 0, "category": "writing", "turns": ["ok"]}) + "\n"
                 + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        load_source(SourceSpec(path=str(p), format="mt_bench"), "prompt")
    assert f"row 1, field '{field}'" in str(e.value)
    kept = load_source(SourceSpec(path=str(p), format="mt_bench"), "prompt",
                       on_bad_rows="skip")
    assert [r["id"] for r in kept] == ["0"]
