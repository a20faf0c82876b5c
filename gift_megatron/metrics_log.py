"""Per-step metrics: kept in memory (every rank), written by rank 0 to RUN_DIR/metrics.jsonl and
TensorBoard (RUN_DIR/tb); a resumed run first drops what a crashed run logged past its checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, *, writes: bool) -> None:
        self.path, self.writes, self.history = run_dir / "metrics.jsonl", writes, []
        self.writer = None
        if writes:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def add(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        if not self.writes:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def rewind(self, step: int) -> None:
        """Rank 0: drop what an earlier (crashed) run in this folder logged after `step`, where this run
        starts: those steps run again. A fresh start (step 0) keeps nothing."""
        if self.path.exists():
            rows = []
            for line in self.path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    break
            self.history = [r for r in rows if r["step"] <= step] if step else []
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, self.path)
        if self.writer is not None:  # TensorBoard hides events after purge_step written by the crashed run
            log_dir = self.writer.log_dir
            self.writer.close()
            self.writer = type(self.writer)(log_dir, purge_step=step + 1 if step else 0)

    def evals(self) -> list[float]:
        return [h["eval_accuracy"] for h in self.history if "eval_accuracy" in h]

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """The progress bar's live numbers: reward, the last held-out accuracy, the engine/trainer mismatch."""
        post = {"reward": f"{metrics['reward']:.3f}"}
        evals = self.evals()
        if evals:
            post["acc"] = f"{evals[-1]:.3f}"
        if "logprob_diff_mean" in metrics:
            post["mismatch"] = f"{metrics['logprob_diff_mean']:.1e}"
        return post

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
