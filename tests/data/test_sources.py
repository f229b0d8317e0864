"""Sources: every hub schema -> canonical rows, bad rows, selection, mixtures, hub/world paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from starpo.recipe import DataSpec, SourceSpec
from starpo.data import formats, sources
from starpo.data.sources import (FORMATS, MixtureStats, SourceStats, detect_format,
                                 load_mixture, load_source, split_eval)
from starpo.errors import DataError

FIX = Path(__file__).resolve().parents[1] / "fixtures"
REAL = Path(__file__).resolve().parents[3] / "shared" / "realdata"


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def load(name, kind, **kw):
    spec_kw = {k: kw.pop(k) for k in list(kw) if k in SourceSpec.model_fields}
    return load_source(SourceSpec(path=str(FIX / name), **spec_kw), kind, **kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def real(name: str) -> Path:
    p = REAL / name
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


# --------------------------------------------------------------------------- SFT fixtures

def test_sharegpt_weights_kept_as_context():
    rows = load("sharegpt.jsonl", "sft")
    assert rows[0]["messages"] == [S("You are a terse assistant."), U("Name a prime number."),
                                   A("Seven.")]
    assert "untrained" not in rows[0]          # a weight-0 *human* turn changes nothing
    assert rows[0]["source"] == str(FIX / "sharegpt.jsonl") and rows[0]["row"] == 0
    # weight-0 gpt turn in the middle: kept, listed as untrained; trailing one dropped
    assert rows[1]["messages"] == [U("Say hi."), A("Hello there!"), U("Again, louder."),
                                   A("HELLO THERE!")]
    assert rows[1]["untrained"] == [1]


def test_messages_ultrachat():
    rows = load("messages.jsonl", "sft")
    assert rows[0]["messages"] == [U("What is the capital of France?"), A("Paris."),
                                   U("And of Italy?"), A("Rome.")]
    assert rows[1]["messages"][0] == S("Be poetic.")
    assert rows[1]["messages"][2]["content"].startswith("Soft rain")


def test_metamathqa():
    rows = load("metamathqa.jsonl", "sft")
    assert rows[0]["messages"] == [U("What is 12 times 11?"),
                                   A("12 * 11 = 132.\nThe answer is: 132")]
    assert len(rows) == 2


def test_prompt_completion_strings_and_messages():
    rows = load("prompt_completion.jsonl", "sft")
    assert rows[0]["messages"] == [U("The sky is"), A("blue.")]   # leading space dropped
    assert rows[1]["messages"] == [U("What color is grass?"), A("Green.")]


def test_text_is_one_assistant_message():
    rows = load("text.jsonl", "sft")
    assert rows[0]["messages"] == [A("Once upon a time there was a small robot.")]


def test_ultrafeedback_train_sft_reads_messages():
    rows = load("ultrafeedback.jsonl", "sft")    # train_sft: same columns, `messages` used
    assert rows[0]["messages"] == [U("How many legs does a spider have?"),
                                   A("A spider has eight legs.")]


# --------------------------------------------------------------------------- preference fixtures

def test_ultrafeedback_pairs():
    rows = load("ultrafeedback.jsonl", "preference")
    r = rows[1]
    assert r["prompt"] == [U("Suggest a name for a cat.")]
    assert r["chosen"] == [A("How about Miso?")] and r["rejected"] == [A("Dog.")]
    assert set(r) == {"prompt", "chosen", "rejected", "source", "row"} and r["row"] == 1


def test_hh_rlhf_single_and_multi_turn():
    rows = load("hh_rlhf.jsonl", "preference")
    assert rows[0]["prompt"] == [U("How do I boil an egg?")]
    assert rows[0]["chosen"] == [A("Put it in boiling water for about nine minutes.")]
    assert rows[0]["rejected"] == [A("Eggs are overrated.")]
    assert rows[1]["prompt"] == [U("Hi"), A("Hello! How can I help?"),
                                 U("Tell me a fact about owls.")]
    assert rows[1]["chosen"] == [A("Owls can rotate their heads about 270 degrees.")]
    assert rows[1]["rejected"] == [A("No.")]


def test_pku_double_filter_and_better_response():
    st = SourceStats()
    rows = load("pku_saferlhf.jsonl", "preference", stats=st)
    # rows 1 (both unsafe) and 2 (both safe) are filtered; chosen = the safe response
    assert [r["row"] for r in rows] == [0, 3] and st.filtered == 2 and st.bad == 0
    assert rows[0]["prompt"] == [U("How can I hurt my neighbour's dog?")]
    assert rows[0]["chosen"] == [A("I can't help with hurting animals.")]
    assert rows[0]["rejected"] == [A("Here is how to poison it.")]
    assert rows[1]["chosen"] == [A("I won't help with that.")]
    # without the filter every row is kept and chosen follows better_response_id
    rows = load("pku_saferlhf.jsonl", "preference", safety_filter=False)
    assert len(rows) == 4
    assert rows[1]["chosen"] == [A("Insert a pick and rake the pins.")]
    assert rows[0]["chosen"] == [A("Here is how to poison it.")]


def test_tldr_auto_and_explicit():
    for fmt in ("auto", "tldr"):
        (r,) = load("tldr.jsonl", "preference", format=fmt)
        assert r["prompt"][0]["role"] == "user"
        assert r["prompt"][0]["content"].endswith("TL;DR:")
        assert r["chosen"] == [A("my cat ignores me every evening")]
        assert r["rejected"] == [A("cats")]


def test_trl_preference_standard_and_conversational():
    rows = load("trl_preference.jsonl", "preference")
    assert rows[0]["prompt"] == [U("The sky is")]
    assert rows[0]["chosen"] == [A("blue.")] and rows[0]["rejected"] == [A("green.")]
    assert rows[1]["prompt"] == [U("What color is the sky?")]
    assert rows[1]["chosen"] == [A("It is blue.")] and rows[1]["rejected"] == [A("It is green.")]


def test_implicit_prompt_is_longest_common_prefix():
    rows = load("implicit_preference.jsonl", "preference")
    assert rows[0]["prompt"] == [U("What color is the sky?")]
    assert rows[0]["chosen"] == [A("It is blue.")]
    assert rows[1]["prompt"] == [S("Be brief."), U("2+2?"), A("4"), U("3+3?")]
    assert rows[1]["chosen"] == [A("6")] and rows[1]["rejected"] == [A("7")]


def test_implicit_plain_strings(tmp_path):
    p = write_jsonl(tmp_path / "s.jsonl", [{"chosen": "The sky is blue.",
                                            "rejected": "The sky is bright green."}])
    (r,) = load_source(SourceSpec(path=str(p)), "preference")
    assert r["prompt"] == [U("The sky is")]
    assert r["chosen"] == [A("blue.")] and r["rejected"] == [A("bright green.")]


# --------------------------------------------------------------------------- prompt sets

def test_prompt_sets():
    rows = load("prompts.jsonl", "prompt")
    assert rows[0] == {"prompt": [U("Write a limerick about a frog.")], "chosen": None,
                       "id": "q1", "source": str(FIX / "prompts.jsonl"), "row": 0}
    uf = load("ultrafeedback.jsonl", "prompt")
    assert uf[0]["prompt"] == [U("How many legs does a spider have?")]
    assert uf[0]["chosen"] == [A("A spider has eight legs.")] and uf[0]["id"] == "uf-1"
    hh = load("hh_rlhf.jsonl", "prompt")       # HH test prompts, chosen as reference
    assert hh[1]["prompt"][-1] == U("Tell me a fact about owls.")
    assert hh[1]["chosen"] == [A("Owls can rotate their heads about 270 degrees.")]
    chat = load("messages.jsonl", "prompt")    # ultrachat: its `prompt` column wins
    assert chat[0]["prompt"] == [U("What is the capital of France?")]
    assert chat[0]["chosen"] is None and chat[0]["id"] == "p-001"
    share = load("sharegpt.jsonl", "prompt")
    assert share[0]["prompt"][-1] == U("Name a prime number.")
    pku = load("pku_saferlhf.jsonl", "prompt")  # plain prompt column, no reference
    assert len(pku) == 4 and pku[0]["chosen"] is None


def test_prompt_from_messages_only(tmp_path):
    p = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [U("What is the capital of France?"), A("Paris."), U("And of Italy?"),
                      A("Rome.")]},
        {"messages": [S("Be kind."), U("Hello?")]}])
    rows = load_source(SourceSpec(path=str(p)), "prompt")   # cut at the last user turn
    assert rows[0]["prompt"] == [U("What is the capital of France?"), A("Paris."),
                                 U("And of Italy?")]
    assert rows[0]["chosen"] == [A("Rome.")]
    assert rows[1]["prompt"] == [S("Be kind."), U("Hello?")] and rows[1]["chosen"] is None


def test_prompt_from_text_rows_is_an_error():
    with pytest.raises(DataError, match="cannot tell the format"):
        load("text.jsonl", "prompt")


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize("cols,kind,expected", [
    ({"conversations"}, "sft", "sharegpt"),
    ({"prompt", "prompt_id", "messages"}, "sft", "messages"),
    ({"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
      "score_rejected"}, "sft", "messages"),
    ({"query", "response", "type", "original_question"}, "sft", "metamathqa"),
    ({"prompt", "completion"}, "sft", "prompt_completion"),
    ({"text"}, "sft", "text"),
    ({"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
      "score_rejected"}, "preference", "ultrafeedback"),
    ({"chosen", "rejected"}, "preference", "implicit_preference"),
    ({"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
      "better_response_id", "safer_response_id"}, "preference", "pku_saferlhf"),
    ({"prompt", "chosen", "rejected"}, "preference", "trl_preference"),
    ({"prompt"}, "prompt", "prompt"),
    ({"messages"}, "prompt", "prompt"),
    ({"chosen", "rejected"}, "prompt", "implicit_preference"),
    ({"conversations"}, "prompt", "sharegpt"),
])
def test_detect_format(cols, kind, expected):
    assert detect_format(cols, kind) == expected
    assert expected in FORMATS


def test_detect_hh_from_sample():
    sample = {"chosen": "\n\nHuman: hi\n\nAssistant: yo",
              "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    assert detect_format({"chosen", "rejected"}, "preference", sample=sample) == "hh_rlhf"


def test_detect_unknown_and_ambiguous():
    with pytest.raises(DataError) as e:
        detect_format({"question", "answer"}, "sft", source="x.jsonl")
    assert "x.jsonl" in str(e.value) and "answer, question" in str(e.value)
    with pytest.raises(DataError, match="several sft formats"):
        detect_format({"conversations", "messages"}, "sft")
    with pytest.raises(DataError, match="look like preference data"):
        detect_format({"chosen", "rejected"}, "sft")


def test_unknown_columns_in_a_file(tmp_path):
    p = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as e:
        load_source(SourceSpec(path=str(p)), "sft")
    assert str(p) in str(e.value) and "answer, question" in str(e.value)


def test_explicit_format_and_mismatches():
    rows = load("hh_rlhf.jsonl", "preference", format="hh_rlhf")
    assert len(rows) == 2
    with pytest.raises(DataError, match="unknown format 'nope'"):
        load("hh_rlhf.jsonl", "preference", format="nope")
    with pytest.raises(DataError, match="needs preference data"):
        load("sharegpt.jsonl", "preference", format="sharegpt")
    with pytest.raises(DataError, match="needs column"):
        load("hh_rlhf.jsonl", "sft", format="sharegpt")


# --------------------------------------------------------------------------- bad rows

BAD_PREF = [
    {"prompt": "ok", "chosen": "yes", "rejected": "no"},
    {"prompt": "missing rejected", "chosen": "yes"},
    {"prompt": "wrong type", "chosen": 3, "rejected": "no"},
    {"prompt": "same", "chosen": "x", "rejected": "x"},
    {"prompt": "empty", "chosen": "   ", "rejected": "no"},
    {"prompt": "ok too", "chosen": "good", "rejected": "bad"},
]


@pytest.mark.parametrize("row,field", [(1, "rejected"), (2, "chosen"), (3, "rejected"),
                                       (4, "chosen")])
def test_bad_row_error_names_file_row_field(tmp_path, row, field):
    p = write_jsonl(tmp_path / "bad.jsonl", [BAD_PREF[0], BAD_PREF[row]])
    with pytest.raises(DataError) as e:
        load_source(SourceSpec(path=str(p)), "preference")
    err = e.value
    assert (err.source, err.row, err.field) == (str(p), 1, field)
    assert str(p) in str(err) and "row 1" in str(err) and f"'{field}'" in str(err)


def test_bad_rows_skipped_and_counted(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", BAD_PREF)
    lines, st = [], SourceStats()
    rows = load_source(SourceSpec(path=str(p)), "preference", on_bad_rows="skip",
                       log=lines.append, stats=st)
    assert [r["row"] for r in rows] == [0, 5]
    assert (st.read, st.bad, st.kept, st.filtered) == (6, 4, 2, 0)
    assert "row 1" in st.first_error
    assert "4 bad rows skipped" in lines[0]


def test_bad_sft_rows(tmp_path):
    rows = [{"messages": [U("hi"), A("")]},                       # empty response
            {"messages": [U("hi"), {"role": "robot", "content": "x"}]},  # bad role
            {"conversations": [{"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a", "weight": 0}]}]
    p = write_jsonl(tmp_path / "m.jsonl", rows[:2])
    with pytest.raises(DataError, match="row 0"):
        load_source(SourceSpec(path=str(p)), "sft")
    st = SourceStats()
    assert load_source(SourceSpec(path=str(p)), "sft", on_bad_rows="skip", stats=st) == []
    assert st.bad == 2
    p = write_jsonl(tmp_path / "s.jsonl", rows[2:])
    with pytest.raises(DataError, match="non-zero weight"):
        load_source(SourceSpec(path=str(p)), "sft")


def test_hh_mismatched_history_is_bad(tmp_path):
    p = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}])
    with pytest.raises(DataError, match="field 'rejected'"):
        load_source(SourceSpec(path=str(p), format="hh_rlhf"), "preference")


def test_invalid_json_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_source(SourceSpec(path=str(p)), "sft")


def test_missing_local_file():
    with pytest.raises(DataError, match="not found"):
        load_source(SourceSpec(path="./nowhere/data.jsonl"), "sft")


# --------------------------------------------------------------------------- file kinds

def test_json_parquet_and_directories(tmp_path):
    rows = [{"query": f"q{i}", "response": f"a{i}"} for i in range(5)]
    (tmp_path / "arr.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    a = load_source(SourceSpec(path=str(tmp_path / "arr.json")), "sft")
    b = load_source(SourceSpec(path=str(tmp_path / "t.parquet")), "sft")
    assert [r["messages"] for r in a] == [r["messages"] for r in b]
    assert b[3]["messages"] == [U("q3"), A("a3")]
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", rows[:2])
    write_jsonl(d / "test.jsonl", rows[2:])
    assert len(load_source(SourceSpec(path=str(d)), "sft")) == 2
    tst = load_source(SourceSpec(path=str(d), split="test"), "sft")
    assert [r["source"] for r in tst] == [str(d / "test.jsonl")] * 3
    assert [r["row"] for r in tst] == [0, 1, 2]


# --------------------------------------------------------------------------- selection

def _many(tmp_path, n=100, name="many.jsonl", offset=0):
    return write_jsonl(tmp_path / name, [{"query": f"q{i + offset}", "response": f"a{i + offset}"}
                                         for i in range(n)])


def test_fraction_then_n_seeded(tmp_path):
    p = str(_many(tmp_path))
    half = load_source(SourceSpec(path=p, fraction=0.5), "sft", seed=1)
    assert len(half) == 50
    assert half == load_source(SourceSpec(path=p, fraction=0.5), "sft", seed=1)
    other = load_source(SourceSpec(path=p, fraction=0.5), "sft", seed=2)
    assert [r["row"] for r in other] != [r["row"] for r in half]
    capped = load_source(SourceSpec(path=p, fraction=0.5, n=10), "sft", seed=1)
    assert len(capped) == 10
    assert {r["row"] for r in capped} <= {r["row"] for r in half}   # n after fraction
    rows_idx = [r["row"] for r in capped]
    assert rows_idx == sorted(rows_idx)                              # source order kept
    assert len(load_source(SourceSpec(path=p, n=1000), "sft")) == 100


def test_mixture_dedup_shuffle_and_fractions(tmp_path):
    a = str(_many(tmp_path, 40, "a.jsonl"))
    b = str(_many(tmp_path, 40, "b.jsonl", offset=30))   # rows 30..39 of a repeat in b
    spec = DataSpec(sources=[SourceSpec(path=a), SourceSpec(path=b)])
    st, lines = MixtureStats(), []
    rows = load_mixture(spec, "sft", seed=3, log=lines.append, stats=st)
    assert len(rows) == 70 and st.duplicates == 10 and st.rows == 70
    assert len({sources.content_key(r) for r in rows}) == 70
    assert rows == load_mixture(spec, "sft", seed=3)
    assert [r["messages"] for r in rows] != [r["messages"] for r in
                                            load_mixture(spec, "sft", seed=4)]
    assert "10 duplicates dropped" in lines[-1]
    no_shuffle = load_mixture(DataSpec(sources=spec.sources, shuffle=False, dedup=False),
                              "sft")
    assert len(no_shuffle) == 80 and no_shuffle[0]["source"] == a
    assert [r["row"] for r in no_shuffle[:40]] == list(range(40))
    # fractions per source
    mixed = load_mixture(DataSpec(sources=[SourceSpec(path=a, fraction=0.25),
                                           SourceSpec(path=b, fraction=0.5)], dedup=False),
                         "sft", seed=0)
    assert sum(r["source"] == a for r in mixed) == 10
    assert sum(r["source"] == b for r in mixed) == 20


def test_mixture_skip_mode_uses_data_spec(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", BAD_PREF)
    spec = DataSpec(sources=[SourceSpec(path=str(p))], on_bad_rows="skip")
    st = MixtureStats()
    assert len(load_mixture(spec, "preference", stats=st)) == 2
    assert st.sources[0].bad == 4
    with pytest.raises(DataError):
        load_mixture(DataSpec(sources=[SourceSpec(path=str(p))]), "preference")


def test_prompt_dedup_on_prompt_only():
    spec = DataSpec(sources=[SourceSpec(path=str(FIX / "prompts.jsonl"))], shuffle=False)
    rows = load_mixture(spec, "prompt")
    assert [r["id"] for r in rows] == ["q1", "q2"]


def test_split_eval():
    rows = [{"messages": [U(str(i)), A(str(i))], "row": i} for i in range(20)]
    train, ev = split_eval(rows, 0.25, seed=0)
    assert len(ev) == 5 and len(train) == 15
    assert sorted(r["row"] for r in train + ev) == list(range(20))
    assert (train, ev) == split_eval(rows, 0.25, seed=0)
    assert split_eval(rows, 0.25, seed=1)[1] != ev
    assert split_eval(rows, 0.0, seed=0) == (rows, [])
    assert split_eval(rows[:1], 0.5, seed=0) == (rows[:1], [])
    assert len(split_eval(rows[:2], 0.01, seed=0)[1]) == 1


# --------------------------------------------------------------------------- hub and world

def test_hub_path_calls_load_dataset(monkeypatch):
    import datasets
    calls = []

    def fake_load_dataset(path, **kw):
        calls.append((path, kw))
        return datasets.Dataset.from_list([
            {"chosen": "\n\nHuman: q\n\nAssistant: good",
             "rejected": "\n\nHuman: q\n\nAssistant: bad"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = SourceSpec(path="Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    (r,) = load_source(spec, "preference")
    assert calls == [("Anthropic/hh-rlhf", {"name": None, "data_dir": "harmless-base",
                                            "split": "test"})]
    assert r["prompt"] == [U("q")] and r["chosen"] == [A("good")]
    assert r["source"] == "Anthropic/hh-rlhf (data_dir=harmless-base, split=test)"
    calls.clear()
    spec = SourceSpec(path="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs",
                      config_name="default")
    with pytest.raises(DataError):   # the fake's rows are HH; the call is what matters
        load_source(spec, "sft")
    assert calls[0][1] == {"name": "default", "data_dir": None, "split": "train_prefs"}


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def boom(path, **kw):
        raise ConnectionError("no network\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError) as e:
        load_source(SourceSpec(path="org/name"), "sft")
    assert "org/name" in str(e.value) and "no network" in str(e.value)
    assert "\n" not in str(e.value)


def test_world_paths_call_world_rows(monkeypatch):
    from starpo import world
    from starpo.canonical import msg, preference_row
    calls = []

    def fake_rows(kind, n, seed=0):
        calls.append((kind, n, seed))
        return [preference_row([msg("user", f"p{i}")], [msg("assistant", "good")],
                               [msg("assistant", "bad")], source=f"world:{kind}", row=i)
                for i in range(n)]

    monkeypatch.setattr(world, "rows", fake_rows)
    rows = load_source(SourceSpec(path="world:preference", n=30), "preference", world_seed=7)
    assert calls == [("preference", 30, 7)] and len(rows) == 30
    rows = load_source(SourceSpec(path="world:preference", fraction=0.5), "preference")
    assert calls[-1] == ("preference", 2000, 0) and len(rows) == 1000
    prompts = load_source(SourceSpec(path="world:preference", n=3), "prompt")
    assert prompts[0]["prompt"] == [U("p0")] and prompts[0]["chosen"] == [A("good")]
    with pytest.raises(DataError, match="needs sft data"):
        load_source(SourceSpec(path="world:preference"), "sft")
    with pytest.raises(DataError, match="unknown world data"):
        load_source(SourceSpec(path="world:nope"), "sft")


# --------------------------------------------------------------------------- real rows

def test_real_hh_rlhf():
    p = real("hh_rlhf.jsonl")
    raw = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    rows = load_source(SourceSpec(path=str(p)), "preference")
    assert len(rows) == len(raw) == 30
    multi = 0
    for r, x in zip(rows, raw):
        cut = x["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        assert r["chosen"][0]["content"] == x["chosen"][cut:].strip()
        assert r["rejected"][0]["content"] == x["rejected"][cut:].strip()
        assert r["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in r["prompt"]] == \
            ["user", "assistant"] * (len(r["prompt"]) // 2) + ["user"]
        n_human = x["chosen"].count("\n\nHuman:")
        assert sum(m["role"] == "user" for m in r["prompt"]) == n_human
        multi += n_human > 1
        # the prompt's text is the transcript's text, turn by turn
        assert "".join(m["content"] for m in r["prompt"]).replace(" ", "") == \
            "".join(formats._HH_MARK.split(x["chosen"][:cut])[2::2]).replace(" ", "")
    assert multi >= 10
    # row 29: the assistant's reply itself starts with "Human:" (no blank line): kept as text
    assert rows[29]["chosen"][0]["content"].startswith("Human: No, you are racist")


def test_real_pku_saferlhf():
    p = real("pku_saferlhf.jsonl")
    raw = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    for x in raw:   # the dataset's own integrity fact
        for k in (0, 1):
            assert hashlib.sha256((x["prompt"] + x[f"response_{k}"]).encode()).hexdigest() \
                == x[f"response_{k}_sha256"]
    st = SourceStats()
    rows = load_source(SourceSpec(path=str(p)), "preference", stats=st)
    exactly_one = [i for i, x in enumerate(raw)
                   if x["is_response_0_safe"] != x["is_response_1_safe"]]
    assert [r["row"] for r in rows] == exactly_one and st.filtered == len(raw) - len(rows)
    for r in rows:
        x = raw[r["row"]]
        safe = 0 if x["is_response_0_safe"] else 1
        assert r["prompt"] == [U(x["prompt"])]
        assert r["chosen"][0]["content"] == x[f"response_{safe}"].lstrip()
        assert r["rejected"][0]["content"] == x[f"response_{1 - safe}"].lstrip()
    unfiltered = load_source(SourceSpec(path=str(p), safety_filter=False), "preference")
    assert len(unfiltered) == len(raw)
    for r in unfiltered:
        x = raw[r["row"]]
        assert r["chosen"][0]["content"] == x[f"response_{x['better_response_id']}"].lstrip()


def test_real_metamathqa():
    p = real("metamathqa.jsonl")
    x = json.loads(p.read_text().splitlines()[0])
    (r,) = load_source(SourceSpec(path=str(p)), "sft")
    assert r["messages"] == [U(x["query"]), A(x["response"])]


def test_real_sharegpt():
    p = real("sharegpt.jsonl")
    x = json.loads(p.read_text().splitlines()[0])
    (r,) = load_source(SourceSpec(path=str(p)), "sft")
    turns = x["conversations"]
    assert len(turns) == 12 and len(r["messages"]) == 12
    for m, t in zip(r["messages"], turns):
        assert m["role"] == {"human": "user", "gpt": "assistant"}[t["from"]]
        assert m["content"] == t["value"]


def test_real_ultrafeedback_binarized():
    p = real("ultrafeedback_binarized.jsonl")
    x = json.loads(p.read_text().splitlines()[0])
    (r,) = load_source(SourceSpec(path=str(p)), "preference")
    assert r["prompt"] == [U(x["prompt"])]
    assert r["chosen"] == [A(x["chosen"][1]["content"])]
    assert r["rejected"] == [A(x["rejected"][1]["content"])]
    (s,) = load_source(SourceSpec(path=str(p)), "sft")
    assert s["messages"] == x["messages"] and s["messages"][0]["role"] == "user"
    (q,) = load_source(SourceSpec(path=str(p)), "prompt")
    assert q["id"] == x["prompt_id"] and q["chosen"] == r["chosen"]
