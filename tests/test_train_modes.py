"""gift-train beyond the embedded default: vLLM servers, several trainer ranks (torchrun, gloo), and
JSONL prompts with rewards composed by config (math verifier + exact answer + a reward model).

Every run here is the real CLI in a subprocess with real vLLM servers on 127.0.0.1.
"""

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gift_megatron.launch import free_port
from tests.netwatch import run_recording_listeners
from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["num_steps=3", "eval_every=3", "save_every=3", "rollout=vllm_servers", "rollout.num_servers=1",
         "data.warmup_max_steps=150",  # the tied GQA model reaches 0.11 only at 400 (~100 s on 2 cores): enough here
         # real structures: a tied head, GQA, and sync buckets (50 kB) smaller than every fused qkv/gate_up
         "model.untie_embeddings_and_output_weights=false", "model.num_query_groups=2",
         "rollout.weight_sync_bucket_mb=0.05"]


TOKEN_BUDGET = ["parallel.max_tokens_per_micro_batch=50"]  # sequences of up to 22 (16 + 6): 2 to 12 per bin


def train(run_dir: Path, *overrides: str, ranks: int = 1, local: bool = False) -> list[dict]:
    """The CLI; several ranks by torchrun, or with `local` by gift_megatron.launch_local. The TCP sockets
    its processes listened on go to `<run_dir>.listen.json` (launcher PID, [pid, address, port])."""
    launcher = [sys.executable, "-m", "gift_megatron.train"]
    if ranks > 1 and local:
        launcher = [sys.executable, "-m", "gift_megatron.launch_local", f"--nproc={ranks}", "--"]
    elif ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                    f"--master-port={free_port()}", "-m", "gift_megatron.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc, pid, listened = run_recording_listeners([*launcher, f"run_dir={run_dir}", *overrides], timeout=900,
                                                  cwd=ROOT, env=env)
    assert proc.returncode == 0, explain(proc)
    (run_dir.parent / f"{run_dir.name}.listen.json").write_text(json.dumps([pid, sorted(listened)]))
    (run_dir.parent / f"{run_dir.name}.out").write_text(proc.stdout + proc.stderr)  # for checks of the logs
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one_rank(runs):
    return train(runs / "one_rank", *SHORT)


@pytest.mark.parametrize("layout, local", [
    # TP=2, two servers synced through vLLM's weight-transfer API (gloo backend: the NCCL path's handshake)
    (["parallel=tp2", "rollout.num_servers=2", "rollout.weight_sync=gloo"], False),
    # PP=2 with token-budget micro-batches (length-sorted bins that cut groups), DP=2 with the same budget
    # as packed rows, against the one fixed-batch process: the same losses and updates
    (["parallel=tp2", "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
      *TOKEN_BUDGET], False),
    (["parallel=tp2", "parallel.tensor_model_parallel_size=1", *TOKEN_BUDGET, "parallel.sequence_packing=true"],
     True),  # DP=2, by launch_local
], ids=["tp2-2servers-transfer", "pp2-files-token-budget", "dp2-files-packed"])
def test_two_ranks_train_like_one(runs, one_rank, layout, local):
    """Two trainer processes (gloo) + vLLM servers: rank 0 generates and broadcasts, every rank trains
    its shard, weights are gathered and synced (bucket files, or the weight-transfer API). Same seeds
    -> the same samples, losses and updates as one process with one server (rewards equal, loss and
    grad-norm to float32 reduction-order noise). Through launch_local, every socket the run's processes
    listened on (its store, gloo, the vLLM server) was on loopback."""
    name = str(len(list(runs.iterdir())))
    rows = train(runs / name, *SHORT, *layout, ranks=2, local=local)
    if local:
        launcher, listened = json.loads((runs / f"{name}.listen.json").read_text())
        assert any(pid == launcher for pid, _, _ in listened), listened  # the rendezvous store
        assert all(ipaddress.ip_address(addr).is_loopback for _, addr, _ in listened), listened
    steps, ref = [r for r in rows if "reward" in r], [r for r in one_rank if "reward" in r]
    assert len(steps) == len(ref) == 3
    for got, want in zip(steps, ref):
        assert got["reward"] == want["reward"]  # the same completions: the synced weights agree
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        # vLLM vs the sharded trainer, over every rank's samples; 1e-4: the sync-precision gate (fp32 on both
        # sides, accumulation-order noise: measured <= 1e-5 in these runs; a broken sync >= 1.6e-2)
        assert got["logprob_diff_max"] < 1e-4
        assert got["time_sync"] > 0
        if TOKEN_BUDGET[0] in layout:  # bins padded to their own longest: less padding, more micro-batches
            assert got["padding_frac"] < want["padding_frac"]
    assert rows[-1]["eval_accuracy"] == one_rank[-1]["eval_accuracy"]
    assert (runs / name / "checkpoints" / "step_00000003").exists()
    out = (runs / f"{name}.out").read_text()  # rank 0 logs; rank 1's lines (the same) are not repeated
    assert out.count("] - done: {") == 1 and out.count("initial weights:") == 1, out[-3000:]


AHEAD = ["rollout.max_staleness=1", "algo=grpo", "algo.tis_cap=2.0"]


def test_rollouts_ahead_two_ranks_train_like_one(runs):
    """rollout.max_staleness=1 with a server: generation of batch n + 1 overlaps step n on rank 0's
    background thread; GRPO with truncated IS (pi_old / pi_behav from the engine's log-probs). At k = 1 a
    batch's version does not depend on timing (rollout/ahead.py), so TP=2 equals one rank: the same
    samples, staleness, IS weights, losses; each verified step checked against its generating weights."""
    one = train(runs / "ahead_one", *SHORT, *AHEAD)
    two = train(runs / "ahead_tp2", *SHORT, *AHEAD, "parallel=tp2", ranks=2)
    steps, ref = [r for r in two if "reward" in r], [r for r in one if "reward" in r]
    assert [r["staleness"] for r in ref] == [r["staleness"] for r in steps] == [0.0, 1.0, 1.0]
    for got, want in zip(steps, ref):
        assert got["reward"] == want["reward"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["tis_weight_mean"] == pytest.approx(want["tis_weight_mean"], rel=1e-5)
        assert got["logprob_diff_max"] < 1e-4 and want["logprob_diff_max"] < 1e-4
    # on-policy step 1: weight 1 up to the engine/trainer mismatch; the stale batches are reweighted
    assert [abs(r["tis_weight_mean"] - 1) > 1e-5 for r in ref] == [False, True, True], ref
    assert two[-1]["eval_accuracy"] == one[-1]["eval_accuracy"]


def test_jsonl_prompts_with_composed_rewards(tmp_path):
    """data=jsonl: a GSM8K-style file and a tokenizer folder; reward = 1.0 x math_verify + 0.5 x exact
    + 0.1 x a (tiny, random) reward model, scored as groups arrive; warm-up from the file's answers."""
    import torch
    import transformers

    from tests.tokenizers import save_char_tokenizer

    save_char_tokenizer(tmp_path / "tok")
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(10, 100, (1200, 2), generator=g).tolist()
    with (tmp_path / "train.jsonl").open("w") as f:
        for a, b in pairs:
            f.write(json.dumps({"question": f"{a}+{b}=", "answer": f"{a + b}"}) + "\n")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=64, num_labels=1, pad_token_id=0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    save_char_tokenizer(tmp_path / "rm")
    terms = (f"[{{kind:math_verify,weight:1.0}},{{kind:exact,weight:0.5}},"
             f"{{kind:reward_model,path:{tmp_path}/rm,weight:0.1}}]")
    rows = train(tmp_path / "run", "data=gsm8k_jsonl", f"data.path={tmp_path}/train.jsonl",
                 f"data.tokenizer={tmp_path}/tok", "data.use_chat_template=false", "data.max_prompt_length=16",
                 "data.num_prompts_per_step=32", "data.num_eval_prompts=200", f"reward.terms={terms}",
                 "num_steps=4", "eval_every=4", "save_every=4")
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 4
    for r in steps:
        parts = r["reward_math_verify"] + 0.5 * r["reward_exact"] + 0.1 * r["reward_reward_model"]
        assert r["reward"] == pytest.approx(parts, abs=1e-5)
        assert 0 < r["reward_math_verify"] < 1 and r["reward_reward_model"] != 0
        assert r["logprob_diff_max"] < 1e-3  # the run's float32 alarm value: this test is about data and rewards
    assert rows[0]["eval_accuracy"] > 0.02  # the warm-up on the file's answers worked


def test_hydra_multirun_locally_gives_each_run_its_folder(tmp_path):
    """`gift-train -m algo=gift,grpo ...` with Hydra's basic launcher: one run after the other, each
    in its own folder under the sweep folder (no "," or "=" in paths), both training."""
    proc = subprocess.run([sys.executable, "-m", "gift_megatron.train", "-m", "algo=gift,grpo", "num_steps=1",
                           "eval_every=1", "save_every=1", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT,
                          capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, explain(proc)
    for num, algo in enumerate(["gift", "grpo"]):
        run_dir = tmp_path / "sweep" / f"{num}_algo-{algo}_eval_every-1_num_steps-1_save_every-1"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1] and "reward" in rows[1]
        assert (run_dir / "config.yaml").read_text().count(f"name: {algo}") == 1
