"""Experiment trackers: Weights & Biases and MLflow runs beside metrics.jsonl and TensorBoard (rank 0 only).

`logger.backends` picks them (config.py `LoggerConfig`); metrics.jsonl is written whatever it says. At the
start, the resolved config (flattened: "optim.lr") and the source tree's git commit go to each tracker as
the run's config / parameters; then every metrics row goes to each one with its step; at the end each run
is closed as finished, failed or stopped (a stop signal: W&B "preempting", MLflow KILLED).

A resumed run continues the same tracker runs. Their ids live in RUN_DIR/trackers.json, written (atomically)
before the first row is logged and read at every start. The id names the whole run folder, not one step,
so it is not kept in the checkpoints: it is the same for every checkpoint, a run that crashed before its
first checkpoint still resumes into it, and a resume from an older checkpoint (or one the rotation kept)
still finds it. `move_old_run=true` moves the file with the old run, so the new run gets new tracker runs.

Secrets come from the environment only (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN, ...) and are never written.
wandb and mlflow are imported here only when selected. Pure Python: no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gift_megatron.run_dir import _git_commit
from gift_megatron.stop import Preempted

log = logging.getLogger(__name__)
BACKENDS = ("tensorboard", "wandb", "mlflow")
PIP_PACKAGE = {"wandb": "wandb", "mlflow": "mlflow-skinny"}  # the module each backend imports -> its pip package
IDS_FILE = "trackers.json"
WANDB_ID_CHARS = string.ascii_lowercase + string.digits  # what W&B run ids are made of
STOP_EXIT_CODES = (75, 130)  # train.py: EXIT_PREEMPTED, EXIT_INTERRUPTED (a stop after the checkpoint)
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
MLFLOW_BATCH = {"params": 100, "metrics": 1000}  # MLflow's limits on one log_batch call


def not_installed(backends: list[str]) -> str | None:
    """A message naming the pip package of the first selected tracker that is not installed, else None."""
    for backend in backends:
        if backend in PIP_PACKAGE and importlib.util.find_spec(backend) is None:
            return (f"logger.backends includes {backend}, but it is not installed: "
                    f"pip install {PIP_PACKAGE[backend]} (or leave {backend} out of logger.backends)")
    return None


def _import(backend: str):
    try:
        return importlib.import_module(backend)
    except ImportError as e:
        raise RuntimeError(f"{not_installed([backend]) or f'logger.backends includes {backend}'} ({e})") from e


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}; lists (and empty dicts) stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_params(config: dict) -> dict[str, Any]:
    """What every tracker records as the run's config: the flattened config and the git commit."""
    return flatten(config) | {"git_commit": _git_commit()}


def read_ids(run_dir: Path) -> dict[str, dict]:
    """RUN_DIR/trackers.json ({} when there is none, or it is damaged: new tracker runs then)."""
    path = Path(run_dir) / IDS_FILE
    if not path.exists():
        return {}
    try:
        ids = json.loads(path.read_text())
        if isinstance(ids, dict):
            return ids
        problem = f"not an object ({type(ids).__name__})"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    log.warning("%s is damaged (%s): the trackers start new runs", path, problem)
    return {}


def _write_ids(run_dir: Path, ids: dict[str, dict]) -> None:
    path = Path(run_dir) / IDS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    os.replace(tmp, path)


def outcome(exc: BaseException | None) -> tuple[str, int]:
    """How a run ended -> ("finished" | "stopped" | "failed", exit code). A stop signal ends the trainer with
    Preempted, turned into sys.exit(75 or 130) by train.py after the checkpoint is saved."""
    if exc is None:
        return "finished", 0
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return ("finished", 0) if code == 0 else ("stopped" if code in STOP_EXIT_CODES else "failed", code)
    if isinstance(exc, (Preempted, KeyboardInterrupt)):
        return "stopped", STOP_EXIT_CODES[0]
    return "failed", 1


class _Wandb:
    """One W&B run, resumed by id (resume="allow": W&B creates it the first time)."""

    name = "wandb"

    def __init__(self, cfg, run_dir: Path, run_name: str, params: dict, saved: dict, quiet: bool, save_ids) -> None:
        wandb = _import("wandb")
        where = {"project": cfg.project, "entity": cfg.entity}
        if saved and {k: saved.get(k) for k in where} != where:
            log.warning("W&B: the run logged to %s before, now to %s: starting a new W&B run", saved, where)
            saved = {}
        run_id = saved.get("id") or "".join(secrets.choice(WANDB_ID_CHARS) for _ in range(8))
        save_ids({"id": run_id, **where})  # before the run exists: a crash from here on still resumes it
        settings = wandb.Settings(silent=quiet)
        try:
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, id=run_id,
                                  resume="allow", dir=str(run_dir), mode=cfg.mode, config=params, settings=settings,
                                  allow_val_change=True)
        except Exception as e:
            raise RuntimeError(f"W&B could not start its run ({type(e).__name__}: {e}). logger.backends includes "
                               f"wandb: online runs need WANDB_API_KEY (or `wandb login`); logger.wandb.mode=offline "
                               f"logs without a server (upload later with `wandb sync`)") from e
        self.id = run_id
        log.info("W&B run %s (%s)%s", run_id, cfg.mode or "mode from WANDB_MODE / online",
                 f": {self.run.url}" if getattr(self.run, "url", None) else "")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self, how: str, code: int) -> None:
        if how == "stopped":
            self.run.mark_preempting()  # the next start resumes it
        self.run.finish(exit_code=code)


def mlflow_key(name: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, _ - . / space :): "eval_pass@4" ->
    "eval_pass_at_4"; any other character becomes "_"."""
    return re.sub(r"[^\w\-./ :]", "_", name.replace("@", "_at_"))


def _mlflow_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MLFLOW_PARAM_CHARS]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class _Mlflow:
    """One MLflow run, reopened by run_id (MlflowClient only: no fluent API, no global active run)."""

    name = "mlflow"

    def __init__(self, cfg, run_dir: Path, run_name: str, params: dict, saved: dict, quiet: bool, save_ids) -> None:
        _import("mlflow")  # a clear error naming the pip package when it is missing
        if quiet:
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        from mlflow.entities import Metric, Param, RunStatus, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.Metric, self.MlflowException = Metric, MlflowException
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / "mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):  # MLflow 3 refuses its file store (maintenance mode) unless asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        run = None
        if saved and saved.get("tracking_uri") != uri:
            log.warning("MLflow: the run logged to %s before, now to %s: starting a new MLflow run",
                        saved.get("tracking_uri"), uri)
        elif saved.get("run_id"):
            try:
                run = client.get_run(saved["run_id"])
            except MlflowException as e:
                log.warning("MLflow: run %s not found at %s (%s): starting a new MLflow run", saved["run_id"], uri, e)
            if run is not None and run.info.lifecycle_stage == "deleted":
                log.warning("MLflow: run %s was deleted: starting a new MLflow run", saved["run_id"])
                run = None
        if run is None:
            commit = params.get("git_commit")
            run = client.create_run(self._experiment(cfg.experiment), run_name=cfg.run_name or run_name,
                                    tags={"mlflow.source.git.commit": commit} if commit else None)
            save_ids({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri})
        else:
            client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.id = run.info.run_id
        # Parameters cannot change in MLflow: a resume adds the new ones and records changed values as tags
        old = run.data.params
        new = {mlflow_key(k): _mlflow_value(v) for k, v in params.items()}
        tags = [RunTag(f"changed.{k}", f"{old[k]} -> {v}") for k, v in new.items() if k in old and old[k] != v]
        fresh = [Param(k, v) for k, v in new.items() if k not in old]
        for chunk in _chunks(fresh, MLFLOW_BATCH["params"]):
            client.log_batch(self.id, params=chunk)
        for chunk in _chunks(tags, MLFLOW_BATCH["params"]):
            client.log_batch(self.id, tags=chunk)
        log.info("MLflow run %s at %s", self.id, uri)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except self.MlflowException:  # another run created it meanwhile (a sweep)
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise RuntimeError(f"logger.mlflow.experiment={name!r} was deleted in MLflow: restore it, or use "
                               f"another name")
        return found.experiment_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        ms = int(time.time() * 1000)
        rows = [self.Metric(mlflow_key(k), float(v), ms, step) for k, v in metrics.items()]
        for chunk in _chunks(rows, MLFLOW_BATCH["metrics"]):
            self.client.log_batch(self.id, metrics=chunk)

    def close(self, how: str, code: int) -> None:
        self.client.set_terminated(self.id, status=MLFLOW_STATUS[how])


class Trackers:
    """The W&B / MLflow runs of one run folder (rank 0 only; `backends` may also name tensorboard, which
    MetricsLog writes itself). `logger`: a config.LoggerConfig; `config`: the resolved config (a dict)."""

    def __init__(self, logger, run_dir: Path, config: dict, *, log_level: str = "WARNING") -> None:
        self.run_dir = Path(run_dir)
        self.open: list[_Wandb | _Mlflow] = []
        self.ids: dict[str, str] = {}  # backend -> its run's id (W&B id, MLflow run_id)
        self._failed: set[str] = set()
        quiet = log_level == "WARNING"
        if quiet:
            os.environ.setdefault("WANDB_SILENT", "true")
        params, run_name = run_params(config), self.run_dir.resolve().name
        ids = read_ids(self.run_dir)

        def saver(name: str):
            def save(entry: dict) -> None:
                ids[name] = entry
                _write_ids(self.run_dir, ids)
            return save

        kinds: dict[str, tuple[type[_Wandb] | type[_Mlflow], object]] = {
            "wandb": (_Wandb, logger.wandb), "mlflow": (_Mlflow, logger.mlflow)}
        try:
            for name in logger.backends:
                if name in kinds:
                    kind, cfg = kinds[name]
                    self.open.append(kind(cfg, self.run_dir, run_name, params, ids.get(name, {}), quiet, saver(name)))
                    self.ids[name] = self.open[-1].id
        except BaseException:
            self.close(*outcome(sys.exc_info()[1]))
            raise

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One metrics row. A tracker that fails (its server down) is warned about once and skipped for this
        row; metrics.jsonl still has every row, and training goes on."""
        for tracker in self.open:
            try:
                tracker.log(step, metrics)
            except Exception as e:
                if tracker.name not in self._failed:
                    log.warning("%s: logging step %d failed (%s): training goes on, metrics.jsonl has every row; "
                                "later failures of %s are not reported", tracker.name, step, e, tracker.name)
                self._failed.add(tracker.name)

    def close(self, how: str | None = None, code: int = 0) -> None:
        """End every run: `how` is finished | failed | stopped; None: from the exception being handled now
        (close is called from `finally:` blocks), finished when there is none."""
        if how is None:
            how, code = outcome(sys.exc_info()[1])
        while self.open:
            tracker = self.open.pop()
            try:
                tracker.close(how, code)
            except Exception as e:  # never hide the error that is ending the run
                log.warning("%s: closing the run failed: %s", tracker.name, e)
