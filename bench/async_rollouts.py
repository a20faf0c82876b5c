"""Rollouts ahead of training (`rollout.max_staleness` = k): convergence under staleness, and wall time.

`convergence`: each (variant, k, seed) is a real `gift-train` run of the embedded task (2-digit
addition, tiny model, CPU, in-process vLLM) for `--steps` steps with held-out greedy accuracy every
`--eval-every`. Variants: GIFT (default), GIFT as the paper writes it (algo=gift_paper), GRPO without
and with truncated IS (algo.tis_cap=2; at k = 0 the weight is 1 up to the engine/trainer mismatch,
so that run is the GRPO one and is skipped). Printed: held-out accuracy at the start, the end and
its best, as mean +- std over seeds, the change against the same variant at k = 0, and wall seconds;
plot: accuracy vs step and vs wall second per variant, one band per k.

`walltime`: seconds per step, synchronous vs k = 1, with one vLLM server started by the trainer,
the two configurations alternated `--repeats` times in one run (side by side on the same machine).

Run: python bench/async_rollouts.py convergence [--seeds 1 2 3 --steps 120 --staleness 0 1 2]
     python bench/async_rollouts.py walltime [--walltime-steps 60 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from convergence import curves, mean_std, save_figure

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"gift": ["algo=gift"], "gift_paper": ["algo=gift_paper"], "grpo": ["algo=grpo"],
            "grpo_tis": ["algo=grpo", "algo.tis_cap=2.0"]}


def train(run_dir: Path, overrides: list[str], steps: int, env: dict | None = None) -> list[dict]:
    """A finished run's metrics (reused when the folder already holds all `steps`)."""
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.exists() and any(json.loads(x)["step"] == steps for x in metrics.read_text().splitlines())):
        cmd = [sys.executable, "-m", "gift_megatron.train", f"num_steps={steps}", f"save_every={steps}",
               f"run_dir={run_dir}", "resume=false", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in metrics.read_text().splitlines()]


def convergence(a) -> None:
    results: dict[str, dict[int, list[list[dict]]]] = {}
    for name, overrides in VARIANTS.items():
        for k in a.staleness:
            results.setdefault(name, {})
            if name == "grpo_tis" and k == 0 and 0 in results.get("grpo", {}):
                results[name][0] = results["grpo"][0]  # weight 1 up to the mismatch: the same run
                continue
            results[name][k] = [
                train(a.out / f"{name}_k{k}_seed{s}", [*overrides, f"seed={s}", f"rollout.max_staleness={k}",
                                                       f"eval_every={a.eval_every}", *a.overrides], a.steps)
                for s in a.seeds]
            print(f"done: {name} k={k}", file=sys.stderr, flush=True)

    print(f"{len(a.seeds)} seeds x {a.steps} steps; held-out greedy accuracy (500 prompts), mean +- std over seeds")
    print("variant | k | start | final | best | final - final at k=0, same seed | mean accuracy over the evals - "
          "the same at k=0, same seed | mean staleness | s per step")
    for name, by_k in results.items():
        base = [curves(rows)[1] for rows in by_k[min(by_k)]]
        for k, runs in sorted(by_k.items()):
            acc = [curves(rows)[1] for rows in runs]
            steps = [r for rows in runs for r in rows if "time_step" in r]
            final = [x[-1] for x in acc]
            d_final = [x[-1] - b[-1] for x, b in zip(acc, base)]  # paired by seed: the seeds share their start
            d_mean = [statistics.mean(x[1:]) - statistics.mean(b[1:]) for x, b in zip(acc, base)]
            print(f"{name} | {k} | {mean_std([x[0] for x in acc])} | {mean_std(final)} | "
                  f"{mean_std([max(x) for x in acc])} | {mean_std(d_final)} | {mean_std(d_mean)} | "
                  f"{statistics.mean(r.get('staleness', 0.0) for r in steps):.2f} | "
                  f"{statistics.mean(r['time_step'] for r in steps):.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 7), squeeze=False)
    for col, (name, by_k) in enumerate(results.items()):
        for k, runs in sorted(by_k.items()):
            cs = [curves(rows) for rows in runs]
            acc = np.array([c[1] for c in cs])
            wall = np.array([c[2] for c in cs]).mean(0)
            for ax, x in ((axes[0, col], cs[0][0]), (axes[1, col], wall)):
                ax.plot(x, acc.mean(0), label=f"k={k}")
                ax.fill_between(x, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.2)
        axes[0, col].set_title(name)
        axes[0, col].set_xlabel("step")
        axes[1, col].set_xlabel("wall seconds (train steps + evals)")
        axes[0, col].set_ylabel("held-out accuracy")
        axes[1, col].set_ylabel("held-out accuracy")
    fig.suptitle(f"rollout.max_staleness = k, embedded task, mean +- std over {len(a.seeds)} seeds")
    save_figure(fig, axes.flatten(), a.out / "async_convergence.png")


def walltime(a) -> None:
    setups = {"synchronous (k=0)": ["rollout.max_staleness=0"], "ahead (k=1)": ["rollout.max_staleness=1"]}
    base = ["rollout=vllm_servers", "rollout.num_servers=1", f"eval_every={a.walltime_steps}",
            "data.num_eval_prompts=100", *a.overrides]
    steps: dict[str, list[dict]] = {name: [] for name in setups}
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads)) if a.threads else None
    for rep in range(a.repeats):
        for name, overrides in setups.items():
            rows = train(a.out / f"walltime_{name.split()[0]}_{rep}", [*base, *overrides], a.walltime_steps, env)
            steps[name] += [r for r in rows if "time_step" in r and r["step"] > 1]  # step 1 waits for batch 1
    print(f"seconds per step, one vLLM server, {a.walltime_steps - 1} steps x {a.repeats} runs each, alternated; "
          f"threads per process: {a.threads or 'default'}")
    print("setup | step | generate | trainer passes (old + ref + verify + train) | sync | trainer waited for the "
          "batch | sync waited for the round")
    mean = {}
    for name, rows in steps.items():
        m = {key: statistics.mean(r.get(key, 0.0) for r in rows) for key in
             ("time_step", "time_generate", "time_policy_logprobs", "time_reference", "time_verify", "time_train",
              "time_sync", "time_wait_rollout", "time_wait_round")}
        mean[name] = m
        m["passes"] = m["time_policy_logprobs"] + m["time_reference"] + m["time_verify"] + m["time_train"]
        print(f"{name} | {m['time_step']:.3f} | {m['time_generate']:.3f} | {m['passes']:.3f} | {m['time_sync']:.3f} | "
              f"{m['time_wait_rollout']:.3f} | {m['time_wait_round']:.3f}")
    sync, ahead = mean["synchronous (k=0)"], mean["ahead (k=1)"]
    rest = sync["time_step"] - sync["time_generate"] - sync["passes"]  # sync, batch building, rewards
    ideal = (max(sync["time_generate"], sync["passes"]) + rest) / sync["time_step"]
    print(f"step time k=1 / k=0: {ahead['time_step'] / sync['time_step']:.2f}; generation under overlap / alone: "
          f"{ahead['time_generate'] / sync['time_generate']:.2f}; trainer passes under overlap / alone: "
          f"{ahead['passes'] / sync['passes']:.2f}; ideal overlap (each side as fast as alone): "
          f"{ideal:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["convergence", "walltime"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--staleness", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--walltime-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the trainer and the server it "
                    "starts (0: their defaults, every core each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_async")
    ap.add_argument("overrides", nargs="*", help="more gift-train overrides for every run")
    a = ap.parse_args()
    # the engine checked every 10th step: at k > 0 a checked step waits for the next batch (trainer.py)
    a.overrides = ["rollout.verify_every=10", *a.overrides]
    convergence(a) if a.what == "convergence" else walltime(a)


if __name__ == "__main__":
    main()
