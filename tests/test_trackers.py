"""W&B and MLflow trackers (gift_megatron/trackers.py), for real and offline: W&B in offline mode (its run files
read back with wandb's own reader, `wandb leet inspect --json`) and MLflow on a local file store (read back with
MlflowClient). What was logged must come back: every row at its step, the config and git commit, the same
tracker runs after a resume, the end state (finished / stopped / failed); and one CLI run whose trackers hold
exactly its metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gift_megatron.config import Config, LoggerConfig, MlflowConfig, WandbConfig
from gift_megatron.metrics_log import MetricsLog
from gift_megatron.trackers import IDS_FILE, Trackers, mlflow_key
from tests.conftest import CANARY
from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"optim": {"lr": 1e-4, "lr_decay_style": "constant"}, "num_steps": 4, "logger": {"backends": ["wandb"]},
          "reward": {"terms": [{"kind": "format", "weight": 0.5}]}}
ROWS = [{"step": 0, "eval_accuracy": 0.125, "eval_pass@4": 0.5},
        {"step": 1, "reward": 0.1, "loss": 1.5, "time_step": 0.25},
        {"step": 2, "reward": 1 / 3, "loss": -0.75, "eval_accuracy": 0.25, "eval_pass@4": 0.75},
        {"step": 3, "reward": 0.2, "loss": 1e-9, "time_step": 12.5}]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """W&B's settings and caches in the test's folder; no network is used (offline mode, file store). What
trackers.py sets itself (quiet W&B, MLflow's file store allowed) is unset before and after each test."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    own = ("WANDB_SILENT", "MLFLOW_ALLOW_FILE_STORE")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_TRACKING_URI", *own):
        monkeypatch.delenv(var, raising=False)
    yield
    for var in own:
        os.environ.pop(var, None)


def logger(run_dir: Path, *backends: str) -> LoggerConfig:
    return LoggerConfig(backends=list(backends), wandb=WandbConfig(mode="offline"),
                        mlflow=MlflowConfig(tracking_uri=(run_dir / "mlstore").as_uri()))


def log_rows(trackers: Trackers, rows: list[dict]) -> None:
    for row in rows:
        trackers.log(row["step"], {k: v for k, v in row.items() if k != "step"})


def wandb_runs(run_dir: Path) -> list[dict]:
    """Every offline W&B run file under RUN_DIR/wandb, oldest first, read with `wandb leet inspect --json`:
    {"id", "config", "history": {step: row without W&B's own _keys}, "types": record types, "exit_code"}."""
    runs = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, explain(proc)
        run: dict = {"history": {}, "types": set(), "config": {}}
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            kind = record["type"]
            run["types"].add(kind)
            if kind == "run":
                run |= {"id": record["run"]["run_id"], "start": record["run"]["start_time"]}
                run["config"] |= record["run"].get("config", {}).get("update", {})
            elif kind == "config":
                run["config"] |= record["config"].get("update", {})
            elif kind == "history":
                step = int(record["history"].get("step", {}).get("num", 0))
                assert step not in run["history"], f"step {step} logged twice in {path}"
                run["history"][step] = {k: v for k, v in record["history"]["item"].items() if not k.startswith("_")}
            elif kind == "exit":
                run["exit_code"] = record["exit"].get("exit_code", 0)
        runs.append(run)
    return sorted(runs, key=lambda r: r["start"])


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 reads its file store only when allowed
    return MlflowClient(tracking_uri=(run_dir / "mlstore").as_uri())


def mlflow_history(client, run_id: str, keys) -> dict[int, dict]:
    """{step: {metric: value}} of the given metric keys (MLflow's names)."""
    out: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            assert key not in out.get(m.step, {}), f"{key} logged twice at step {m.step}"
            out.setdefault(m.step, {})[key] = m.value
    return out


def by_step(rows: list[dict], rename=lambda k: k) -> dict[int, dict]:
    return {r["step"]: {rename(k): v for k, v in r.items() if k != "step"} for r in rows}


def test_wandb_offline_run_holds_the_config_the_commit_and_every_row(tmp_path, capfd):
    trackers = Trackers(logger(tmp_path, "wandb"), tmp_path, CONFIG)
    log_rows(trackers, ROWS)
    trackers.close()
    noise = capfd.readouterr()
    assert "wandb" not in (noise.out + noise.err).lower()  # W&B's own chatter is off by default
    ids = json.loads((tmp_path / IDS_FILE).read_text())
    [run] = wandb_runs(tmp_path)
    assert run["id"] == ids["wandb"]["id"] == trackers_id(ids, "wandb")
    assert run["history"] == by_step(ROWS)
    assert run["config"]["optim.lr"] == 1e-4 and run["config"]["num_steps"] == 4
    assert run["config"]["reward.terms"] == [{"kind": "format", "weight": 0.5}]
    assert run["config"]["git_commit"] == _git_head()
    assert run["exit_code"] == 0


def trackers_id(ids: dict, name: str) -> str:
    return ids[name]["id"] if name == "wandb" else ids[name]["run_id"]


def _git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_mlflow_file_store_run_holds_the_params_the_commit_and_every_row(tmp_path):
    trackers = Trackers(logger(tmp_path, "mlflow"), tmp_path, CONFIG)
    log_rows(trackers, ROWS)
    trackers.close()
    client = mlflow_client(tmp_path)
    [experiment] = [e for e in client.search_experiments() if e.name == "gift-megatron"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    keys = {mlflow_key(k) for r in ROWS for k in r if k != "step"}
    assert "eval_pass_at_4" in keys and set(run.data.metrics) == keys
    assert mlflow_history(client, run.info.run_id, keys) == by_step(ROWS, mlflow_key)
    params = run.data.params
    assert params["optim.lr"] == "0.0001" and params["num_steps"] == "4" and params["git_commit"] == _git_head()
    assert json.loads(params["reward.terms"]) == [{"kind": "format", "weight": 0.5}]
    assert run.data.tags["mlflow.source.git.commit"] == _git_head()


def test_a_resume_continues_the_same_runs_and_appends_its_steps(tmp_path):
    """A stopped segment (steps 0-1), then a resumed one (steps 2-3, num_steps changed): one W&B run id in two
    run files (the first marked preempting), one MLflow run with every step, the changed value recorded."""
    first = Trackers(logger(tmp_path, "wandb", "mlflow"), tmp_path, CONFIG)
    ids = dict(first.ids)
    log_rows(first, ROWS[:2])
    first.close("stopped", 75)
    client = mlflow_client(tmp_path)
    assert client.get_run(ids["mlflow"]).info.status == "KILLED"
    second = Trackers(logger(tmp_path, "wandb", "mlflow"), tmp_path, CONFIG | {"num_steps": 8})
    assert second.ids == ids
    log_rows(second, ROWS[2:])
    second.close()
    before, after = wandb_runs(tmp_path)
    assert before["id"] == after["id"] == ids["wandb"]
    assert before["history"] == by_step(ROWS[:2]) and after["history"] == by_step(ROWS[2:])
    assert "preempting" in before["types"] and before["exit_code"] == 75 and after["exit_code"] == 0
    assert after["config"]["num_steps"] == 8
    [experiment] = [e for e in client.search_experiments() if e.name == "gift-megatron"]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    keys = {mlflow_key(k) for r in ROWS for k in r if k != "step"}
    assert mlflow_history(client, run.info.run_id, keys) == by_step(ROWS, mlflow_key)
    assert run.data.params["num_steps"] == "4" and run.data.tags["changed.num_steps"] == "4 -> 8"


def test_a_run_that_raises_ends_its_tracker_runs_as_failed(tmp_path):
    """close() from a `finally:` reads the exception in flight: the runs end failed, not finished."""
    trackers = Trackers(logger(tmp_path, "wandb", "mlflow"), tmp_path, CONFIG)
    with pytest.raises(RuntimeError, match="the step failed"):
        try:
            log_rows(trackers, ROWS[:1])
            raise RuntimeError("the step failed")
        finally:
            trackers.close()
    assert mlflow_client(tmp_path).get_run(trackers_id(json.loads((tmp_path / IDS_FILE).read_text()), "mlflow")) \
        .info.status == "FAILED"
    [run] = wandb_runs(tmp_path)
    assert run["exit_code"] == 1 and run["history"] == by_step(ROWS[:1])


def test_a_changed_tracking_store_or_project_starts_new_runs(tmp_path):
    first = Trackers(logger(tmp_path, "wandb", "mlflow"), tmp_path, CONFIG)
    first.close()
    moved = logger(tmp_path, "wandb", "mlflow")
    moved.wandb.project, moved.mlflow.tracking_uri = "elsewhere", (tmp_path / "other").as_uri()
    second = Trackers(moved, tmp_path, CONFIG)
    second.close()
    assert second.ids["wandb"] != first.ids["wandb"] and second.ids["mlflow"] != first.ids["mlflow"]
    assert json.loads((tmp_path / IDS_FILE).read_text())["wandb"]["project"] == "elsewhere"


def test_backend_names_and_missing_packages_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.backends.*'tb'.*\['tensorboard', 'wandb', 'mlflow'\]"):
        LoggerConfig(backends=["tensorboard", "tb"])
    with pytest.raises(ValueError, match="logger.wandb.mode='on'"):
        WandbConfig(mode="on")
    # a Python without site-packages has neither package: the message names what to pip install
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gift_megatron.trackers import not_installed; "
            "print(not_installed(['tensorboard', 'mlflow'])); print(not_installed(['wandb']))")
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.splitlines() == [
        "logger.backends includes mlflow, but it is not installed: pip install mlflow-skinny (or leave mlflow "
        "out of logger.backends)",
        "logger.backends includes wandb, but it is not installed: pip install wandb (or leave wandb out of "
        "logger.backends)"]


def test_online_wandb_without_a_key_is_refused_naming_what_to_set(tmp_path, monkeypatch):
    """No key anywhere (environment, ~/.netrc): W&B refuses before any network use; the error says what to set."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    online = logger(tmp_path, "wandb")
    online.wandb.mode = "online"
    with pytest.raises(RuntimeError, match=r"W&B could not start its run.*WANDB_API_KEY.*logger\.wandb\.mode=offline"):
        Trackers(online, tmp_path, CONFIG)


def test_a_rewind_past_rows_the_trackers_hold_is_reported(tmp_path, caplog):
    """A run SIGKILLed after step 3 with its last checkpoint at 2: step 3 runs again, and the trackers (unlike
    metrics.jsonl) cannot drop what they hold for it: the user is told."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    metrics = MetricsLog(tmp_path, writes=True, cfg=Config(run_dir=str(tmp_path), logger=logger(tmp_path, "mlflow")))
    with caplog.at_level(logging.WARNING):
        metrics.rewind(2)
    metrics.close()
    assert [r["step"] for r in metrics.history] == [0, 1, 2]
    assert any("steps from 3 on" in r.getMessage() and "MLflow keeps both" in r.getMessage() for r in caplog.records)


def test_metrics_log_sends_each_row_to_the_selected_backends_only(tmp_path):
    """MetricsLog with a Config: metrics.jsonl always, W&B and MLflow as selected, no TensorBoard when not."""
    cfg = Config(run_dir=str(tmp_path), logger=logger(tmp_path, "wandb", "mlflow"))
    metrics = MetricsLog(tmp_path, writes=True, cfg=cfg)
    metrics.rewind(0)
    for row in ROWS:
        metrics.add(row["step"], {k: v for k, v in row.items() if k != "step"})
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == ROWS and not (tmp_path / "tb").exists()
    check_trackers_hold(tmp_path, rows)
    [run] = wandb_runs(tmp_path)
    assert run["config"]["logger.backends"] == ["wandb", "mlflow"] and run["config"]["run_dir"] == str(tmp_path)


def check_trackers_hold(run_dir: Path, rows: list[dict]) -> None:
    """The W&B run (every segment's file) and the MLflow run hold exactly `rows`, by step."""
    ids = json.loads((run_dir / IDS_FILE).read_text())
    runs = wandb_runs(run_dir)
    assert {r["id"] for r in runs} == {ids["wandb"]["id"]}
    assert {s: row for r in runs for s, row in r["history"].items()} == by_step(rows)
    client = mlflow_client(run_dir)
    keys = {mlflow_key(k) for r in rows for k in r if k != "step"}
    assert set(client.get_run(ids["mlflow"]["run_id"]).data.metrics) == keys
    assert mlflow_history(client, ids["mlflow"]["run_id"], keys) == by_step(rows, mlflow_key)


def test_cli_run_and_its_resume_log_to_every_backend_what_metrics_jsonl_holds(tmp_path):
    """gift-train, 2 steps then resumed to 3, with tensorboard, wandb (offline) and mlflow (file store) and a
    canary W&B key in the environment: the resume continues the same W&B and MLflow runs, which hold exactly
    metrics.jsonl; TensorBoard is written; the key is written nowhere."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_API_KEY=CANARY)
    cmd = [sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", "eval_every=2", "save_every=1",
           "logger.backends=[tensorboard,wandb,mlflow]", "logger.wandb.mode=offline",
           f"logger.mlflow.tracking_uri={(run_dir / 'mlstore').as_uri()}"]
    ids = []
    for steps in (2, 3):
        proc = subprocess.run([*cmd, f"num_steps={steps}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env=env)
        assert proc.returncode == 0, explain(proc)
        assert CANARY not in proc.stdout + proc.stderr
        ids.append(json.loads((run_dir / IDS_FILE).read_text()))
    assert ids[0] == ids[1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and "eval_accuracy" in rows[2] and "eval_accuracy" in rows[3]
    check_trackers_hold(run_dir, rows)
    first, resumed = wandb_runs(run_dir)
    assert sorted(first["history"]) == [0, 1, 2] and sorted(resumed["history"]) == [3]
    assert first["exit_code"] == resumed["exit_code"] == 0 and resumed["config"]["num_steps"] == 3
    assert mlflow_client(run_dir).get_run(ids[0]["mlflow"]["run_id"]).info.status == "FINISHED"
    assert any((run_dir / "tb").iterdir())
    for path in run_dir.rglob("*"):
        assert not path.is_file() or CANARY.encode() not in path.read_bytes(), path
