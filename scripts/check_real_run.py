"""Do a run's checkpoints still write coherent English? Checked in plain transformers.

    python scripts/check_real_run.py runs/smollm2-hh [--n 16] [--max-new-tokens 64]

For the starting model and every policy stage of the run (``DIR/<stage>/model/``), this
loads the checkpoint with ``AutoModelForCausalLM``/``AutoTokenizer`` alone (no starpo
code on the sampling path), samples one answer per prompt (the first ``--n`` prompts of
each eval stage's data: held-out HH prompts and MT-Bench questions; the same seed for
every model; temperature 0.7, top-p 0.9), and
measures what degenerate text would fail: the share of empty answers, distinct-1 and
distinct-2 (pooled over the answers; repeated tokens drive them towards 0), the
end-of-turn rate (answers that ended with the end-of-turn token within the budget) and
the mean length. It prints a table and three sample answers per model, and writes both to
``DIR/plain_check.json`` and ``DIR/plain_check.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _prompts(run: Path, n: int) -> list[tuple[str, list[dict]]]:
    """``(eval stage, messages)``: the first ``n`` prompts of each eval stage's data, read
    as the stage reads them (so this runs before or beside the evaluation)."""
    from starpo.data.sources import load_mixture
    from starpo.recipe import load_recipe
    rec = load_recipe(run / "recipe.yaml")
    out = []
    for st in rec.stages:
        if st.evaluates:
            rows = load_mixture(st.data, "prompt", world_seed=rec.world.seed, seed=rec.seed)
            out += [(st.name, r["prompt"]) for r in rows[:n]]
    return out


def _models(run: Path) -> list[tuple[str, str]]:
    from starpo.recipe import load_recipe
    rec = load_recipe(run / "recipe.yaml")
    out = [("base", str(Path(rec.model.name_or_path).expanduser()))]
    out += [(st.name, str(run / st.name / "model")) for st in rec.stages
            if st.yields_policy and (run / st.name / "model" / "config.json").is_file()]
    return out


@torch.no_grad()
def _answers(path: str, prompts: list[list[dict]], max_new: int, seed: int
             ) -> list[tuple[str, bool]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    stops = {tok.eos_token_id, eot} - {None}
    out = []
    for i, msgs in enumerate(prompts):
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        torch.manual_seed(seed + i)       # the same stream for every model
        gen = model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.9,
                             max_new_tokens=max_new, eos_token_id=sorted(stops),
                             pad_token_id=tok.pad_token_id)
        new = gen[0, enc["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] in stops
        out.append((tok.decode(new, skip_special_tokens=True).strip(), ended))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=8, help="prompts per eval stage (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from starpo.metrics.stats import distinct_n

    prompts = _prompts(args.run, args.n)
    if not prompts:
        print(f"{args.run}: its recipe has no eval stage to take prompts from", file=sys.stderr)
        return 2
    rows, samples = {}, {}
    for name, path in _models(args.run):
        ans = _answers(path, [p for _, p in prompts], args.max_new_tokens, args.seed)
        texts = [a for a, _ in ans]
        rows[name] = {"prompts": len(ans),
                      "empty": sum(not t for t in texts) / len(ans),
                      "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
                      "end_of_turn_rate": sum(e for _, e in ans) / len(ans),
                      "mean_words": sum(len(t.split()) for t in texts) / len(ans)}
        samples[name] = [{"from": w, "prompt": p[-1]["content"], "answer": a}
                         for (w, p), (a, _) in list(zip(prompts, ans))[:3]]
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    head = "| model | prompts | empty | distinct-1 | distinct-2 | end-of-turn rate | mean words |"
    lines = [head, "| --- " * 7 + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['prompts']} | {r['empty']:.2f} | {r['distinct_1']:.2f} | "
                     f"{r['distinct_2']:.2f} | {r['end_of_turn_rate']:.2f} | "
                     f"{r['mean_words']:.1f} |")
    for name, ss in samples.items():
        lines.append(f"\n**{name}**\n")
        for s in ss:
            lines.append(f"- *{s['prompt'][:160]}* → {s['answer']}")
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    (args.run / "plain_check.json").write_text(json.dumps({"models": rows, "samples": samples,
                                                           "max_new_tokens":
                                                           args.max_new_tokens}, indent=1))
    (args.run / "plain_check.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
