"""The real slurm/gift_32b.sbatch on a real (local) Slurm cluster: 2 fake nodes on this machine
(ci/slurm/slurm-ci-up.sh: Debian's Slurm, installed on first use), shrunk only by sbatch options and
the `slurm_ci_tiny` experiment. Also: preemption (USR1 -> checkpoint -> requeue -> resume), MPI rank
discovery under `srun --mpi=pmi2`, and a Hydra multirun submitted as Slurm jobs by submitit.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]
CI_DIR = "/tmp/slurm-ci"
ENV = dict(os.environ, SLURM_CI_DIR=CI_DIR, SLURM_CI_NODES="2", SLURM_CI_CPUS="4", SLURM_CI_GPUS="2",
           SLURM_CONF=f"{CI_DIR}/slurm.conf", OMP_NUM_THREADS="1")
PY = sys.executable


def sh(*cmd: str, timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check:
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster():
    sh("ci/slurm/slurm-ci-down.sh", check=False)
    sh("ci/slurm/slurm-ci-up.sh", timeout=600)
    yield
    sh("ci/slurm/slurm-ci-down.sh", check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_runs")  # one warm-up cache (runs/.warmup_cache) for all jobs


def submit(runs: Path, name: str, overrides: str) -> tuple[str, Path]:
    """slurm/gift_32b.sbatch shrunk: 2 nodes x 2 tasks, 1 trainer node (TP=2), 1 server node."""
    log = runs / f"{name}.out"
    jid = sh("sbatch", "--parsable", "-p", "debug", "-N2", "--ntasks-per-node=2", "--gpus-per-node=2",
             "--cpus-per-task=1", "--time=00:30:00", "-o", str(log),
             f"--export=ALL,GIFT_PYTHON={PY},GIFT_EXPERIMENT=slurm_ci_tiny,TRAIN_NODES=1,SERVER_TP=1,"
             f"SERVERS_PER_NODE=1,GIFT_LOG_DIR={runs}/{name}_logs,GIFT_OVERRIDES=run_dir={runs}/{name} {overrides}",
             "slurm/gift_32b.sbatch").strip()
    return jid, log


def wait(jid: str, log: Path, timeout: int = 900) -> None:
    proc = subprocess.run(["ci/slurm/slurm-ci-waitjob.sh", jid, str(timeout)], env=ENV, capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + (log.read_text()[-5000:] if log.exists() else "no job log")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sbatch_script_trains_with_a_vllm_server_node(cluster, runs):
    jid, log = submit(runs, "job", "")
    wait(jid, log)
    text = log.read_text()
    bad = [line for line in text.splitlines() if re.search(r"traceback|error|exception", line, re.I)]
    assert not bad, "\n".join(bad[:20])
    assert "trainer on n1, vLLM on n2" in text and "servers healthy: http://127.0.0.1:8000" in text
    assert "weight transfer (gift_gloo) open: 1 servers, group of 2" in text  # rank 0 + the server's worker
    rows = metrics(runs / "job")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # the server started with dummy weights: the first eval already sees the synced warm-up policy
    assert rows[0]["eval_accuracy"] > 0.1
    assert all(r["logprob_diff_max"] < 1e-4 and r["time_sync"] > 0 for r in steps)
    assert (runs / "job" / "checkpoints" / "step_00000004").exists()
    assert (runs / "job_logs" / "server_0.log").exists()


def test_preemption_checkpoints_requeues_and_resumes(cluster, runs):
    """USR1 to the batch script (what --signal=B:USR1@600 sends before the limit): the trainer ends its
    step, checkpoints, exits 75; the script requeues the job; the rerun resumes and finishes."""
    jid, log = submit(runs, "preempted", "num_steps=25 save_every=1000 eval_every=1000")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        path = runs / "preempted" / "metrics.jsonl"
        if path.exists() and sum("reward" in line for line in path.read_text().splitlines()) >= 3:
            break
        time.sleep(1)
    sh("scancel", "--signal=USR1", "--batch", jid)
    while "requeueing job" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(1)
    # Slurm holds a requeued job for ~2 minutes before it is eligible again: release it now
    for _ in range(60):
        if "JobState=PENDING" in sh("scontrol", "show", "job", jid):
            sh("scontrol", "update", f"JobId={jid}", "StartTime=now")
            break
        time.sleep(1)
    wait(jid, log)
    text = log.read_text()
    stopped = int(re.search(r"stop signal: checkpoint at step (\d+)", text).group(1))
    assert "exited with 75" in text or "trainer exited with 143" in text  # 75: EX_TEMPFAIL from gift-train
    assert "(restart 1)" in text and f"resumed from {runs}/preempted/checkpoints/step_{stopped:08d}" in text
    steps = [r["step"] for r in metrics(runs / "preempted") if "reward" in r]
    assert steps == list(range(1, 26))  # every step once: the rerun continued after the checkpoint
    assert sorted(p.name for p in (runs / "preempted" / "checkpoints").glob("step_*")) == [
        f"step_{stopped:08d}", "step_00000025"]


def test_mpi_ranks_under_srun_pmi2(cluster):
    """mpi4py + the mpich wheel under `srun --mpi=pmi2` across the two fake nodes."""
    out = sh("srun", "--mpi=pmi2", "-N2", "-n2", PY, "tests/mpi_rendezvous.py", timeout=300)
    assert sorted(re.findall(r"rank (\d)/2 local \d sum 3.0", out)) == ["0", "1"], out


def test_hydra_multirun_lands_as_slurm_jobs(cluster, runs):
    sweep = runs / "sweep"
    proc = subprocess.run([PY, "-m", "gift_megatron.train", "-m", "hydra/launcher=gift_slurm",
                           "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=20", "algo=gift,grpo",
                           "num_steps=2", "eval_every=2", "save_every=2", f"hydra.sweep.dir={sweep}",
                           f"data.warmup_cache_dir={runs}/.warmup_cache"],
                          env=ENV, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, explain(proc)
    job_ids = sorted({p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit()})
    assert len(job_ids) == 1  # one job array
    for task, algo in enumerate(["gift", "grpo"]):
        subprocess.run(["ci/slurm/slurm-ci-waitjob.sh", f"{job_ids[0]}_{task}", "120"], env=ENV, cwd=ROOT,
                       capture_output=True)  # the result file lands just before the job leaves COMPLETING
        assert "JobState=COMPLETED" in sh("scontrol", "show", "job", f"{job_ids[0]}_{task}")
        run_dir = next(sweep.glob(f"{task}_algo-{algo}_*"))  # override_dirname: no "," or "=" in paths
        assert [r["step"] for r in metrics(run_dir) if "reward" in r] == [1, 2]
        assert (run_dir / "checkpoints" / "step_00000002").exists()
