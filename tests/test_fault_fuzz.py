"""Fault fuzzer: seeded random faults at random moments of a real run, then the same command again.

Each trial draws a fault (SIGKILL of the trainer, one SIGINT, two SIGINTs, SIGTERM, SIGUSR1) and a moment
(a hook point of gift_megatron/faults.py: inside a step -- after generation, after the log-probs, after
the update, after the weight sync --, before an eval, or inside a checkpoint write -- before the data,
before the manifest, before the rename, before the prune -- at a random step), runs the embedded default
with it, then reruns the same command until it finishes. Checked every trial: every checkpoint published
at any time verifies; the finished run's metrics hold every step exactly once and equal the uninterrupted
run's; the final checkpoint's tensors (model and optimizer) equal it bit for bit.

    GIFT_FAULT_TRIALS=100 GIFT_FAULT_SEED=7 .venv/bin/python -m pytest tests/test_fault_fuzz.py   # a larger run

CI runs a small seeded sample at rollout.max_staleness 0 and 1.

Server trials (`GIFT_SERVER_FAULT_TRIALS`, CI: 1): the run uses a vLLM server (`rollout=vllm_servers`),
the fault SIGKILLs it (API server and engine) at a random moment and the trainer finds it dead (it stops
naming the server, exit 1, no checkpoint from inside a step), at max_staleness 0 or 1 drawn; the same
checks, against the uninterrupted run with a server.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gift_megatron.faults import FAULT_ENV, POINTS, SERVER
from gift_megatron.manifest import verify_folder
from tests.conftest import STRAIGHT
from tests.procs import explain
from tests.test_faults import KEYS, _checkpoint_tensors, _rows

ROOT = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("GIFT_FAULT_TRIALS", "2"))
SERVER_TRIALS = int(os.environ.get("GIFT_SERVER_FAULT_TRIALS", "1"))
SEED = int(os.environ.get("GIFT_FAULT_SEED", "0"))
NUM_STEPS, SAVE_EVERY = 4, 2  # STRAIGHT
FAULTS = {"KILL": (-9,), "INT": (130,), "INT_TWICE": (130,), "TERM": (75,), "USR1": (75,), SERVER: (1,)}
WITH_SERVER = ("rollout=vllm_servers", "rollout.num_servers=1")
STEP_POINTS = POINTS[:4]
CHECKPOINT_POINTS = POINTS[5:]


def moments() -> list[tuple[str, int]]:
    """Every (point, step) a run of STRAIGHT reaches, in the order it reaches them."""
    out = []
    for step in range(1, NUM_STEPS + 1):
        out += [(p, step) for p in STEP_POINTS]
        if step == NUM_STEPS:
            out.append(("eval", step))
        if step % SAVE_EVERY == 0 or step == NUM_STEPS:
            out += [(p, step) for p in CHECKPOINT_POINTS]
    return out


def draw(rng: random.Random) -> tuple[str, str]:
    """(fault kind, GIFT_FAULT spec)."""
    kind, at = rng.choice(sorted(set(FAULTS) - {SERVER})), moments()
    i = rng.randrange(len(at))
    spec = "{}:{}:" + kind.removesuffix("_TWICE")
    faults = [spec.format(*at[i])]
    if kind == "INT_TWICE":  # the second at a later moment (if the run still reaches it)
        faults.append(spec.format(*at[rng.randrange(i + 1, len(at))]) if i + 1 < len(at) else faults[0])
    return kind, ",".join(dict.fromkeys(faults))


def _run(run_dir: Path, extra: tuple, fault: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | ({FAULT_ENV: fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *STRAIGHT, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def _published_verify(run_dir: Path) -> None:
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        assert verify_folder(ckpt) == [], ckpt


def trial(run_dir: Path, straight: Path, extra: tuple, kind: str, fault: str) -> None:
    faulted = _run(run_dir, extra, fault)
    assert faulted.returncode in (*FAULTS[kind], 0), (fault, explain(faulted))  # 0: the moment was not reached
    if (run_dir / "checkpoints").exists():
        _published_verify(run_dir)
    for _ in range(3):  # a stop at the last step's boundary leaves nothing to do: the rerun exits 0 at once
        done = _run(run_dir, extra, None)
        if done.returncode == 0:
            break
    assert done.returncode == 0, (fault, explain(done))
    _published_verify(run_dir)
    want, got = _rows(straight), _rows(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want], fault  # every step exactly once
    for w, g in zip(want[1:], got[1:]):
        assert {k: g.get(k) for k in (*KEYS, "staleness")} == {k: w.get(k) for k in (*KEYS, "staleness")}, fault
    assert got[-1]["eval_accuracy"] == want[-1]["eval_accuracy"], fault
    a = _checkpoint_tensors(straight / "checkpoints" / f"step_{NUM_STEPS:08d}")
    b = _checkpoint_tensors(run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), (fault, [k for k in a if not a[k].equal(b[k])])


def test_moments_and_draws_are_what_a_run_reaches():
    at = moments()
    assert at[:4] == [("step_rollout", 1), ("step_logprobs", 1), ("step_train", 1), ("step_sync", 1)]
    assert ("checkpoint_publish", 2) in at and ("checkpoint_publish", 3) not in at and ("eval", 4) in at
    rng = random.Random(0)
    kinds = set()
    for _ in range(200):
        kind, spec = draw(rng)
        kinds.add(kind)
        assert all(s.rsplit(":", 1)[1] == kind.removesuffix("_TWICE") for s in spec.split(","))
    assert kinds == set(FAULTS) - {SERVER}


@pytest.mark.parametrize("trial_index", range(TRIALS))
def test_random_fault_then_rerun_equals_the_uninterrupted_run(trial_index, tmp_path, straight_run):
    rng = random.Random(SEED * 100_003 + trial_index)
    kind, fault = draw(rng)
    print(json.dumps({"trial": trial_index, "seed": SEED, "kind": kind, "fault": fault}))
    trial(tmp_path / "run", straight_run[0], (), kind, fault)


def test_random_fault_with_rollouts_ahead(tmp_path, straight_ahead_run):
    """rollout.max_staleness=1: batches generated ahead are part of the state at a step boundary."""
    rng = random.Random(SEED * 100_003 + 99_991)
    kind, fault = draw(rng)
    print(json.dumps({"seed": SEED, "kind": kind, "fault": fault, "max_staleness": 1}))
    trial(tmp_path / "run", straight_ahead_run, ("rollout.max_staleness=1",), kind, fault)


@pytest.fixture(scope="module")
def straight_with_server(tmp_path_factory):
    """The uninterrupted runs with a vLLM server, by max_staleness, made when a trial first needs one."""
    made: dict[int, Path] = {}

    def get(k: int) -> Path:
        if k not in made:
            made[k] = tmp_path_factory.mktemp(f"straight_server_{k}") / "run"
            proc = _run(made[k], (*WITH_SERVER, f"rollout.max_staleness={k}"), None)
            assert proc.returncode == 0, explain(proc)
        return made[k]
    return get


@pytest.mark.parametrize("trial_index", range(SERVER_TRIALS))
def test_random_server_kill_then_rerun_equals_the_uninterrupted_run(trial_index, tmp_path, straight_with_server):
    rng = random.Random(SEED * 100_003 + 77_777 + trial_index)
    at, k = moments(), rng.choice((0, 1))
    fault = "{}:{}:".format(*at[rng.randrange(len(at))]) + SERVER
    print(json.dumps({"trial": trial_index, "seed": SEED, "kind": SERVER, "fault": fault, "max_staleness": k}))
    trial(tmp_path / "run", straight_with_server(k), (*WITH_SERVER, f"rollout.max_staleness={k}"), SERVER, fault)
