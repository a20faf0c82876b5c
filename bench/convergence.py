"""GIFT vs GRPO vs DAPO vs GSPO on the embedded task (2-digit addition, tiny model, CPU), same budget,
several seeds; and where the time of an embedded-default step goes.

Each (algorithm, seed) is a real `gift-train` run (`algo=<name> seed=<s>`; the seed also sets the
supervised warm-up, cached per seed) of `--steps` steps with held-out greedy accuracy every
`--eval-every` steps. Printed: start and final held-out accuracy (mean and std over seeds), the best,
the steps to reach start + `--gain`, the final training reward, and wall time; the per-phase seconds
of GIFT's steps. Plots (PNG): held-out accuracy vs step and vs wall time, mean +- std over seeds.

Run: python bench/convergence.py [--algos gift grpo dapo gspo --seeds 1 2 3 --steps 120 --out runs/bench_convergence]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time_generate", "time_policy_logprobs", "time_reference", "time_train", "time_sync")


def run(out: Path, algo: str, seed: int, steps: int, eval_every: int, extra: list[str]) -> list[dict]:
    run_dir = out / f"{algo}_seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.exists() and any(json.loads(x)["step"] == steps for x in metrics.read_text().splitlines())):
        cmd = [sys.executable, "-m", "gift_megatron.train", f"algo={algo}", f"seed={seed}", f"num_steps={steps}",
               f"eval_every={eval_every}", f"save_every={steps}", f"run_dir={run_dir}", "resume=false", *extra]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return [json.loads(x) for x in metrics.read_text().splitlines()]


def curves(rows: list[dict]) -> tuple[list[int], list[float], list[float]]:
    """(steps, held-out accuracy, wall seconds) at each evaluation."""
    steps, acc, wall, t = [], [], [], 0.0
    for r in rows:
        t += r.get("time_step", 0.0) + r.get("time_eval", 0.0)
        if "eval_accuracy" in r:
            steps.append(r["step"])
            acc.append(r["eval_accuracy"])
            wall.append(t)
    return steps, acc, wall


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=["gift", "grpo", "dapo", "gspo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--gain", type=float, default=0.03, help="target: start accuracy + gain")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_convergence")
    ap.add_argument("overrides", nargs="*", help="more gift-train overrides for every run")
    a = ap.parse_args()
    results = {algo: {s: run(a.out, algo, s, a.steps, a.eval_every, a.overrides) for s in a.seeds} for algo in a.algos}

    print(f"{len(a.seeds)} seeds x {a.steps} steps; held-out greedy accuracy (500 prompts)")
    print(f"algo | start | final | best | steps to start+{a.gain:.2f} | final train reward | wall s")
    for algo, by_seed in results.items():
        start, final, best, reach, reward, wall = [], [], [], [], [], []
        for rows in by_seed.values():
            steps, acc, secs = curves(rows)
            start.append(acc[0])
            final.append(acc[-1])
            best.append(max(acc))
            reach += [next((s for s, x in zip(steps, acc) if x >= acc[0] + a.gain), None)]
            reward.append(statistics.mean(r["reward"] for r in rows if "reward" in r and r["step"] > a.steps - 10))
            wall.append(secs[-1])
        hit = [x for x in reach if x is not None]
        reached = f"{statistics.mean(hit):.0f} ({len(hit)}/{len(reach)} seeds)" if hit else f"never (0/{len(reach)})"
        print(f"{algo} | {mean_std(start)} | {mean_std(final)} | {mean_std(best)} | {reached} | "
              f"{mean_std(reward)} | {statistics.mean(wall):.0f}")

    if "gift" in results:
        rows = [r for seed_rows in results["gift"].values() for r in seed_rows if "time_step" in r]
        total = statistics.mean(r["time_step"] for r in rows)
        print(f"GIFT step breakdown (mean over {len(rows)} steps): {total:.3f} s per step")
        print("phase | seconds | share")
        for phase in PHASES:
            x = statistics.mean(r.get(phase, 0.0) for r in rows)
            print(f"{phase[5:]} | {x:.3f} | {x / total:.0%}")
        rest = total - sum(statistics.mean(r.get(p, 0.0) for r in rows) for p in PHASES)
        print(f"other (batch building, rewards, loop) | {rest:.3f} | {rest / total:.0%}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for algo, by_seed in results.items():
        cs = [curves(rows) for rows in by_seed.values()]
        steps = cs[0][0]
        acc = np.array([c[1] for c in cs])
        wall = np.array([c[2] for c in cs]).mean(0)
        for ax, x in ((axes[0], steps), (axes[1], wall)):
            ax.plot(x, acc.mean(0), label=algo)
            ax.fill_between(x, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.2)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall seconds (train steps + evals)")
    for ax in axes:
        ax.set_ylabel("held-out accuracy")
    fig.suptitle(f"embedded task, mean +- std over {len(a.seeds)} seeds")
    save_figure(fig, axes, a.out / "convergence.png")


def save_figure(fig, axes, path: Path) -> None:
    """Grid, legends, tight layout, PNG; prints where it went."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
