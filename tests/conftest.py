"""Session-wide settings for every test and the CLI runs they start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]
# One supervised warm-up per model/data config for the whole suite (the CLI runs of several test files
# start from the same embedded default; the cache is keyed by config, so sharing it changes no result).
WARMUP_CACHE = ROOT / "runs" / ".test_cache" / "warmup"
os.environ.setdefault("GIFT_WARMUP_CACHE", str(WARMUP_CACHE))


CANARY = "gift-canary-7f3a9c"  # secrets come from the environment and must never be written anywhere
STRAIGHT = ["num_steps=4", "eval_every=100", "save_every=2"]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """One uninterrupted 4-step run of the embedded default (checkpoints at steps 2 and 4), with canary
    secrets in its environment: the reference that the resume and fault tests compare against.
    Returns (run_dir, the run's output)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    env = dict(os.environ, WANDB_API_KEY=CANARY, HF_TOKEN=CANARY)
    proc = subprocess.run([sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *STRAIGHT], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, explain(proc)
    return run_dir, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def straight_ahead_run(tmp_path_factory):
    """The same 4-step run with rollouts ahead (rollout.max_staleness=1), uninterrupted: the reference of
    the resume tests at k = 1 (test_faults, test_fault_fuzz). Returns its run_dir."""
    run_dir = tmp_path_factory.mktemp("straight_ahead") / "run"
    proc = subprocess.run([sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *STRAIGHT,
                           "rollout.max_staleness=1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, explain(proc)
    return run_dir
