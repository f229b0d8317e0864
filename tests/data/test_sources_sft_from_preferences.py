"""SFT stages on preference data (``use: chosen``), on the real rows of ``realdata``."""

from __future__ import annotations

import json

import pytest

from conftest import realdata
from starpo.recipe import SourceSpec, recipe_from_dict
from starpo.data.sources import SourceStats, load_source
from starpo.data.tokenize import IGNORE, tokenize_conversation
from starpo.errors import DataError

EOT = "<|im_end|>"


def _raw(name):
    return [json.loads(line) for line in realdata(name).read_text().splitlines() if line.strip()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["hh_rlhf.jsonl", "ultrafeedback_binarized.jsonl",
                                  "pku_saferlhf.jsonl"])
def test_sft_is_prompt_plus_chosen_of_each_pair(name):
    path = str(realdata(name))
    pairs = load_source(SourceSpec(path=path), "preference")
    st = SourceStats()
    sft = load_source(SourceSpec(path=path, use="chosen"), "sft", stats=st)
    assert st.format == {"hh_rlhf.jsonl": "hh_rlhf", "ultrafeedback_binarized.jsonl":
                         "ultrafeedback", "pku_saferlhf.jsonl": "pku_saferlhf"}[name]
    assert len(sft) == len(pairs) > 0
    for p, s in zip(pairs, sft):
        assert s["messages"] == p["prompt"] + p["chosen"]
        assert (s["source"], s["row"]) == (p["source"], p["row"])
        # assistant turns of the prompt are context: only the chosen response is trained
        assert s.get("untrained", []) == [i for i, m in enumerate(p["prompt"])
                                          if m["role"] == "assistant"]


def test_ultrafeedback_chosen_conversation_is_the_sft_row():
    raw = _raw("ultrafeedback_binarized.jsonl")[0]
    s = load_source(SourceSpec(path=str(realdata("ultrafeedback_binarized.jsonl")),
                               use="chosen"), "sft")[0]
    assert s["messages"] == [{"role": m["role"], "content": m["content"]} for m in raw["chosen"]]


def test_real_hh_rlhf_multi_turn_trains_only_the_chosen_response(gpt2_chatml):
    rows = load_source(SourceSpec(path=str(realdata("hh_rlhf.jsonl")), use="chosen"), "sft")
    multi = [r for r in rows if r.get("untrained")]
    assert multi, "the real rows hold multi-turn transcripts"
    for r in rows:
        t = tokenize_conversation(gpt2_chatml, r["messages"], untrained=r.get("untrained", ()))
        trained = gpt2_chatml.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE])
        assert trained == r["messages"][-1]["content"] + EOT


@pytest.mark.parametrize("name", ["hh_rlhf.jsonl", "pku_saferlhf.jsonl"])
def test_without_use_chosen_the_error_says_how(name):
    with pytest.raises(DataError) as e:
        load_source(SourceSpec(path=str(realdata(name))), "sft")
    msg = str(e.value)
    assert "look like preference data" in msg and "use: chosen" in msg and "\n" not in msg


def test_explicit_preference_format_in_an_sft_stage_says_how():
    with pytest.raises(DataError, match="use: chosen"):
        load_source(SourceSpec(path=str(realdata("ultrafeedback_binarized.jsonl")),
                               format="ultrafeedback"), "sft")
    with pytest.raises(DataError, match="use: chosen"):
        load_source(SourceSpec(path="world:preference", n=3), "sft")
    assert len(load_source(SourceSpec(path="world:preference", n=3, use="chosen"), "sft")) == 3


def test_use_chosen_only_where_it_means_something():
    with pytest.raises(DataError, match="field 'use'.*sft stages|field 'use'.*preference stage"):
        load_source(SourceSpec(path=str(realdata("hh_rlhf.jsonl")), use="chosen"),
                    "preference")
    with pytest.raises(DataError, match="field 'use'.*gives sft rows"):
        load_source(SourceSpec(path=str(realdata("sharegpt.jsonl")), use="chosen"), "sft")
    with pytest.raises(DataError, match="field 'use'.*gives sft rows"):
        load_source(SourceSpec(path="world:sft", use="chosen"), "sft")


def test_rejected_side_problems_do_not_drop_sft_rows(tmp_path):
    """Real HH-RLHF transcripts recombined the way hub data goes wrong: a pair whose chosen
    and rejected histories differ, and one with an empty rejected answer. A preference stage
    must refuse them; SFT on chosen reads only the chosen side and keeps them."""
    raw = _raw("hh_rlhf.jsonl")
    mismatched = {"chosen": raw[0]["chosen"], "rejected": raw[1]["rejected"]}
    empty_rej = {"chosen": raw[2]["chosen"],
                 "rejected": raw[2]["rejected"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:"}
    p = _write(tmp_path / "hh.jsonl", [raw[3], mismatched, empty_rej])
    st = SourceStats()
    assert len(load_source(SourceSpec(path=str(p)), "preference", on_bad_rows="skip",
                           stats=st)) == 1
    assert st.bad == 2
    sft = load_source(SourceSpec(path=str(p), use="chosen"), "sft")
    assert [r["row"] for r in sft] == [0, 1, 2]
    want = load_source(SourceSpec(path=str(realdata("hh_rlhf.jsonl")), use="chosen"), "sft")
    assert [r["messages"] for r in sft] == [want[3]["messages"], want[0]["messages"],
                                            want[2]["messages"]]


def test_an_empty_chosen_is_still_a_bad_row(tmp_path):
    raw = _raw("hh_rlhf.jsonl")
    bad = {"chosen": raw[0]["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:",
           "rejected": raw[0]["rejected"]}
    p = _write(tmp_path / "hh.jsonl", [raw[1], bad])
    with pytest.raises(DataError, match=r"row 1, field 'chosen': empty response"):
        load_source(SourceSpec(path=str(p), use="chosen"), "sft")


def test_recipe_key_and_dump():
    base = {"stages": [{"type": "sft", "data": {"sources": [{"path": "x.jsonl"}]}}]}
    rec = recipe_from_dict(base)
    # unset: not in the dump, so stage hashes and prepared-data keys stay as they were
    assert "use" not in rec.stages[0].data.sources[0].model_dump(mode="json")
    base["stages"][0]["data"]["sources"][0]["use"] = "chosen"
    rec = recipe_from_dict(base)
    assert rec.stages[0].data.sources[0].model_dump(mode="json")["use"] == "chosen"
    base["stages"][0]["data"]["sources"][0]["use"] = "rejected"
    from starpo.errors import RecipeError
    with pytest.raises(RecipeError, match=r"stages\.sft\.data\.sources\.0\.use"):
        recipe_from_dict(base)
