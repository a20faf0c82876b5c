"""Per-step metrics: kept in memory (every rank), written by rank 0 to RUN_DIR/metrics.jsonl and to the
backends of `logger.backends`: TensorBoard (RUN_DIR/tb), W&B and MLflow (trackers.py); a resumed run first
drops what a crashed run logged past its checkpoint (TensorBoard hides it too; W&B and MLflow keep it)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gift_megatron.trackers import Trackers

if TYPE_CHECKING:
    from gift_megatron.config import Config

log = logging.getLogger(__name__)
EXCERPT_CHARS = 60


def _parse_row(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """One line of metrics.jsonl -> (the row, "") or (None, what is wrong with it)."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason}: byte {e.start + 1})"
    except json.JSONDecodeError as e:  # e.g. the last line of a run killed while writing it
        return None, f"not JSON ({e.msg}: column {e.colno})"
    if not isinstance(row, dict):
        return None, f"not an object ({type(row).__name__})"
    if not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        return None, f'no int "step" (step={row.get("step")!r})'
    return row, ""


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line, row) of every valid row, in file order. A damaged line (a torn write, disk garbage,
    a row without an int step) anywhere is logged with its line and an excerpt and left out: the rows
    after it are kept. Blank lines carry nothing and are skipped."""
    rows = []
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        row, problem = _parse_row(raw)
        if row is None:
            excerpt = raw[:EXCERPT_CHARS].decode("utf-8", errors="replace")
            log.warning("%s:%d: damaged metrics row removed, %s: %r%s", path, line_no, problem, excerpt,
                        "..." if len(raw) > EXCERPT_CHARS else "")
            continue
        rows.append((line_no, row))
    return rows


def _latest_timeline(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    """The rows in file order, with steps strictly increasing. A step at or below one already seen means
    the file was written again from an earlier point (a restart that skipped `rewind`, or a second run
    writing to the same folder): the later rows win, and every earlier row at or past that step (an
    abandoned timeline; a duplicate step is the simplest case) is dropped with a warning naming the steps.
    Keeping only the last row of each duplicated step instead would leave an abandoned run's later steps
    in place, out of order with the new run's."""
    kept: list[tuple[int, dict[str, Any]]] = []
    for line_no, row in rows:
        dropped = []
        while kept and kept[-1][1]["step"] >= row["step"]:
            dropped.append(kept.pop()[1]["step"])
        if dropped:
            log.warning("%s:%d: step %d logged again (a restarted or second run writing here): keeping the "
                        "later rows, removing the earlier rows of steps %s", path, line_no, row["step"],
                        sorted(dropped))
        kept.append((line_no, row))
    return kept


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The valid rows of a metrics.jsonl, one per step in order (damaged lines and abandoned timelines
    left out, with warnings): for tools that read a run's metrics (the file is not changed)."""
    return [row for _, row in _latest_timeline(Path(path), _read_rows(Path(path)))]


class MetricsLog:
    """`cfg` (a config.Config): its logger.backends and, for W&B / MLflow, the config they record; None:
    TensorBoard only. Only the process that `writes` (rank 0) opens any backend."""

    def __init__(self, run_dir: Path, *, writes: bool, cfg: Config | None = None) -> None:
        self.path, self.writes = run_dir / "metrics.jsonl", writes
        self.history: list[dict] = []
        self.writer, self.trackers = None, None
        backends = cfg.logger.backends if cfg is not None else ["tensorboard"]
        if writes and "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        if writes and cfg is not None and set(backends) - {"tensorboard"}:
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
            assert isinstance(config, dict)
            self.trackers = Trackers(cfg.logger, run_dir, config, log_level=cfg.log_level)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **metrics}
        self.history.append(record)
        if not self.writes:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def rewind(self, step: int) -> None:
        """Rank 0: drop what an earlier (crashed) run in this folder logged after `step`, where this run
        starts: those steps run again. A fresh start (step 0) keeps nothing. Every valid row up to `step`
        is kept; damaged lines and rows superseded by a restart are logged (`_read_rows`, `_latest_timeline`)
        and removed from the file."""
        if self.path.exists():
            logged = _read_rows(self.path) if step else []  # a fresh start drops every row: none is read
            again = any(r["step"] > step for _, r in logged) if step else bool(self.path.read_text().strip())
            if again and self.trackers is not None:
                log.warning("the steps from %d on that an earlier run logged here (it stopped without a checkpoint "
                            "there) run again: W&B keeps the values it has for them (it ignores a step at or below "
                            "its last), MLflow keeps both; metrics.jsonl and TensorBoard only the new ones",
                            step + 1 if step else 0)
            rows = [(n, r) for n, r in logged if r["step"] <= step]
            self.history = [r for _, r in _latest_timeline(self.path, rows)]
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

    def close(self, how: str | None = None, code: int = 0) -> None:
        """TensorBoard's writer, then the trackers' runs, ended as `how` (finished | failed | stopped); None:
        from the exception being handled (called from `finally:`), finished when there is none."""
        if self.writer is not None:
            self.writer.close()
        if self.trackers is not None:
            self.trackers.close(how, code)
