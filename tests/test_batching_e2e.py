"""Every algorithm with every batching option trains end to end: {gift, grpo, dapo, gspo} x
algo.num_mini_batches {1, 2} x {fixed micro-batches, token-budget micro-batches}, 2 RL steps each.

Each combination must exit 0, log steps 1..2 with a finite loss and grad-norm and no skipped update,
and take num_mini_batches optimizer steps per RL step: the final checkpoint's LR-schedule step count
(`scheduler.num_steps` in common.pt; and `optimizer_steps` in its state.json) is 2 x num_mini_batches.
(GIFT with 2 mini-batches once crashed after its first optimizer step: KeyError 'log_beta_median', a
metric its second mini-batch had and its first had not; this test fails on that trainer.)

The 16 runs are one Hydra multirun (one process: imports paid once) against one shared vLLM server
(tests/vllm_server.py; an in-process engine would start 16 times, ~35 s each on 2 cores). Small
steps: 4 prompts x 8 samples (2 prompts per mini-batch), micro-batches of one group or bins of <= 50
tokens (sequences of up to 22), 50 held-out prompts.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.procs import explain
from tests.vllm_server import shared_server

ROOT = Path(__file__).resolve().parents[1]
ALGOS, MINI_BATCHES, BUDGETS = ("gift", "grpo", "dapo", "gspo"), (1, 2), (0, 50)
COMBOS = [(a, m, b) for a in ALGOS for m in MINI_BATCHES for b in BUDGETS]
SMALL = ["num_steps=2", "data.num_prompts_per_step=4", "parallel.micro_batch_size=8", "data.num_eval_prompts=50",
         "eval_every=100", "save_every=100"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(the multirun's process, {(algo, mini-batches, budget): run folder}, {job number: its output})."""
    runs = tmp_path_factory.mktemp("batching")
    server = shared_server(runs / "server")
    cmd = [sys.executable, "-m", "gift_megatron.train", "-m", f"algo={','.join(ALGOS)}",
           f"algo.num_mini_batches={','.join(map(str, MINI_BATCHES))}",
           f"parallel.max_tokens_per_micro_batch={','.join(map(str, BUDGETS))}", *SMALL, *server.overrides,
           f"hydra.sweep.dir={runs}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200,
                          env=server.env(OMP_NUM_THREADS="1"))  # one stream: each job's lines stay in its section
    folders = {}
    for config in (runs / "sweep").glob("*/config.yaml"):
        from omegaconf import OmegaConf

        c = OmegaConf.load(config)
        folders[(c.algo.name, c.algo.num_mini_batches, c.parallel.max_tokens_per_micro_batch)] = config.parent
    text = proc.stdout
    jobs = dict(zip(map(int, re.findall(r"\[HYDRA\]\s+#(\d+) :", text)), re.split(r"\[HYDRA\]\s+#\d+ :", text)[1:]))
    return proc, folders, jobs


def test_the_sweep_exits_zero(sweep):
    proc, folders, _ = sweep
    assert proc.returncode == 0, explain(proc)
    assert sorted(folders) == sorted(COMBOS)


@pytest.mark.parametrize("algo, mini_batches, budget", COMBOS,
                         ids=[f"{a}-mb{m}-{'tokens' if b else 'fixed'}" for a, m, b in COMBOS])
def test_every_algorithm_trains_with_every_batching(sweep, algo, mini_batches, budget):
    proc, folders, jobs = sweep
    job = COMBOS.index((algo, mini_batches, budget))  # Hydra's job order: the sweep's cartesian product
    why = f"job #{job}'s output:\n{jobs.get(job, '')[-3000:]}\n--- the sweep's ---\n{explain(proc, tail=1500)}"
    run = folders.get((algo, mini_batches, budget))
    assert run is not None and (run / "metrics.jsonl").exists(), why
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2], why
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["update_skipped"] == 0, r
    checkpoint = run / "checkpoints" / "step_00000002"
    common = torch.load(checkpoint / "common.pt", weights_only=True)
    assert common["trainer"]["step"] == 2
    assert common["scheduler"]["num_steps"] == 2 * mini_batches  # optimizer steps taken, over the 2 RL steps
    state = json.loads((checkpoint / "state.json").read_text()) if (checkpoint / "state.json").exists() else {}
    assert state.get("optimizer_steps", 2 * mini_batches) == 2 * mini_batches  # the run state's own count
    assert "eval_accuracy" in rows[-1]
