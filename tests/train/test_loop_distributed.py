"""Two processes (DDP over gloo on CPU, launched the way ``accelerate launch`` does: the
environment variables) train to the same weights as one process accumulating the same
micro-batches. The micro-batches hold different numbers of trainable tokens, so this
checks the loss scale: the step's loss is the sum over every token of the step divided by
the *global* token count, whatever the split across processes and accumulation steps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

SCRIPT = textwrap.dedent('''
    import random, sys
    from pathlib import Path
    import torch
    import transformers as T
    from starpo.recipe import TrainSpec
    from starpo.data.packing import layout_sft
    from starpo.data.tokenize import TokenizedSFT
    from starpo.stages.sft import SFTTask
    from starpo.train.loop import run_loop

    out, grad_accum = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, intermediate_size=64)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").float()
    rng = random.Random(0)
    docs = []
    for i in range(24):
        p, r = rng.randint(2, 10), rng.randint(1, 20)      # uneven trainable counts
        ids = [rng.randrange(1, 50) for _ in range(p + r)]
        docs.append(TokenizedSFT(ids, [-100] * p + ids[p:], "t", i))
    layout = layout_sft(docs, mode="pack", loss_masking=True, max_length=32)
    task = SFTTask(layout, batch_size=1, pad_id=0, seed=0)
    spec = TrainSpec(lr=1e-2, max_steps=4, batch_size=1, grad_accum=grad_accum,
                     scheduler="constant", warmup_ratio=0.0, mixed_precision="no",
                     log_every=1, max_grad_norm=None)
    res = run_loop(model, task, spec, out / "run", seed=0, progress=False)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(out / "weights.safetensors"))
        (out / "steps").write_text(str(res.steps))
    # end the process group before the interpreter exits: gloo's threads torn down by
    # static destructors can abort the process ("terminate called without an active
    # exception") on a loaded machine
    from starpo.runtime import Runtime
    Runtime.shutdown()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, grad_accum: int, world: int) -> dict:
    out.mkdir(parents=True)
    script = out / "train.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        if world > 1:
            env.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), str(grad_accum)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    from safetensors.torch import load_file
    assert (out / "steps").read_text() == "4"
    return load_file(str(out / "weights.safetensors"))


def test_two_processes_equal_one_process_accumulating(tmp_path):
    one = _run(tmp_path / "one", grad_accum=2, world=1)
    two = _run(tmp_path / "two", grad_accum=1, world=2)
    start = _initial(tmp_path)
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4, msg=k)
        moved += int(not torch.equal(one[k], start[k]))
    assert moved > 0                 # it trained


def _initial(tmp_path: Path) -> dict:
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, intermediate_size=64)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").float()
    return model.state_dict()
