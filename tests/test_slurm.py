"""The real slurm/gift_32b.sbatch on a real (local) Slurm cluster: 2 fake nodes on this machine
(ci/slurm/slurm-ci-up.sh: Debian's Slurm, installed on first use), shrunk only by sbatch options and
the `slurm_ci_tiny` experiment. Also: preemption (USR1 -> checkpoint -> requeue -> resume), the servers'
job secret, MPI rank discovery under `srun --mpi=pmi2`, and a Hydra multirun submitted as Slurm jobs
by submitit.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

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
    return tmp_path_factory.mktemp("slurm_runs")  # jobs share the suite's warm-up cache ($GIFT_WARMUP_CACHE)


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
    # 1e-4: the sync-precision gate (fp32 both sides, accumulation-order noise: measured <= 1.4e-5 in these runs)
    assert all(r["logprob_diff_max"] < 1e-4 and r["time_sync"] > 0 for r in steps)
    assert (runs / "job" / "checkpoints" / "step_00000004").exists()
    assert (runs / "job_logs" / "server_0.log").exists()


def _text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def _until(ready, deadline: float, what: str) -> None:
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return max([r["step"] for r in rows if "reward" in r], default=0)


def _release(jid: str, log: Path, restart: int, deadline: float) -> None:
    """Slurm holds a requeued job for ~2 minutes before it is eligible again: release it now, but not
    within the second of the requeue: slurmd compares the new job credential's creation time with the
    requeue's revocation time in whole seconds and kills the batch job as "Job credential revoked"
    (seen in CI: released 0.6 s after the requeue, the rerun died at once)."""
    def released() -> bool:
        if "JobState=PENDING" in sh("scontrol", "show", "job", jid):
            time.sleep(2)
            sh("scontrol", "update", f"JobId={jid}", "StartTime=now")
        return f"(restart {restart})" in _text(log)
    _until(released, deadline, f"restart {restart} of job {jid}")


def _server_secret(jid: str) -> str:
    """The job's secret, read where only its owner can: the environment of the job's vLLM server.
    Checked on the way: the server refuses a request without it, to the dev endpoints too."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "vllm.entrypoints.openai.api_server" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get("SLURM_JOB_ID") == jid and env.get("GIFT_SERVER_SECRET"):
            secret = env["GIFT_SERVER_SECRET"]
            assert secret not in " ".join(proc.cmdline())
            rpc = {"method": "gift_checksum"}
            url = "http://127.0.0.1:8000/collective_rpc"
            assert requests.post(url, json=rpc, timeout=60).status_code == 401
            # with the secret: a read-only endpoint (an RPC here would race the trainer's own weight sync,
            # whose reload session leaves the worker's parameters mid-swap: a 500 that says nothing of auth)
            models = "http://127.0.0.1:8000/v1/models"
            assert requests.get(models, timeout=60).status_code == 401
            assert requests.get(models, headers={"Authorization": f"Bearer {secret}"}, timeout=60).status_code == 200
            return secret
    raise AssertionError(f"no vLLM server of job {jid} with GIFT_SERVER_SECRET in its environment")


def test_preemption_checkpoints_requeues_and_resumes(cluster, runs):
    """USR1 to the batch script (what --signal=B:USR1@600 sends before the limit): the trainer ends its
    step, checkpoints, exits 75 and the script reports 75 (srun's --kill-on-bad-exit made it 143); the
    script requeues the job; the rerun resumes and finishes: every step logged once. The servers refuse
    requests without the job's secret, and the secret is in no log and no run_dir file."""
    jid, log = submit(runs, "preempted", "num_steps=25 save_every=1000 eval_every=1000")
    run_dir, deadline = runs / "preempted", time.monotonic() + 900
    _until(lambda: _last_step(run_dir) >= 3, deadline, "step 3")
    secrets = [_server_secret(jid)]
    sh("scancel", "--signal=USR1", "--batch", jid)
    _release(jid, log, 1, deadline)
    first = _text(log)
    stopped = int(re.search(r"stop signal: checkpoint at step (\d+)", first).group(1))
    assert "trainer exited with 75" in first and "trainer exited with 143" not in first
    _until(lambda: _last_step(run_dir) >= stopped + 2, deadline, "2 steps after resuming")
    secrets.append(_server_secret(jid))
    wait(jid, log)
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}" in _text(log)[len(first):]
    steps = [r["step"] for r in metrics(run_dir) if "reward" in r]
    assert steps == list(range(1, 26))  # every step once: the rerun continued after the checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        f"step_{stopped:08d}", "step_00000025"]
    files = [log, *(runs / "preempted_logs").rglob("*"), *run_dir.rglob("*")]
    leaks = [f for f in files if f.is_file() and any(s.encode() in f.read_bytes() for s in secrets)]
    assert not leaks, leaks


def test_mpi_ranks_under_srun_pmi2(cluster):
    """mpi4py + the mpich wheel under `srun --mpi=pmi2` across the two fake nodes."""
    out = sh("srun", "--mpi=pmi2", "-N2", "-n2", PY, "tests/mpi_rendezvous.py", timeout=300)
    assert sorted(re.findall(r"rank (\d)/2 local \d sum 3.0", out)) == ["0", "1"], out


def test_hydra_multirun_lands_as_slurm_jobs(cluster, runs):
    sweep = runs / "sweep"
    proc = subprocess.run([PY, "-m", "gift_megatron.train", "-m", "hydra/launcher=gift_slurm",
                           "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=20", "algo=gift,grpo",
                           "num_steps=2", "eval_every=2", "save_every=2", f"hydra.sweep.dir={sweep}"],
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
