"""Where a training loop's metrics go: ``metrics.jsonl`` (the contract) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

from starpo import fileio
from starpo.train.trackers import current


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus TensorBoard scalars."""

    def __init__(self, out_dir: Path, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = out_dir / "metrics.jsonl"
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # a resumed run rewrites the steps after its checkpoint: drop them first
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if resume_step and rec.get("step", 0) <= resume_step:
                    keep.append(line)
            self.path.write_text("".join(l + "\n" for l in keep))
        self.tb = None
        # inside a pipeline its trackers (starpo.train.trackers) take the metrics, TensorBoard
        # too
        self.trackers = current()
        if tensorboard and self.trackers is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard missing: jsonl is the contract, TB a convenience
                self.tb = None

    def write(self, rec: dict) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as err:
            if fileio.disk_full(err):
                raise fileio.disk_error(self.path, "the metrics log", then="rerun the same "
                                        "command: it resumes from the last checkpoint") from err
            raise
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])
        if self.trackers is not None:
            self.trackers.log(rec, self.path.parent)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
