"""GIFT ablations on the embedded task, each variant at its best learning rate (issue 10).

Stage 1 (sweep): every variant x every `--lrs`, seed `--sweep-seed`, `--steps` steps; the best lr is
the one with the highest mean held-out accuracy over the evaluations after step 0 (area under the
curve: rewards learning fast and staying up). Stage 2: the best lr of each variant with every
`--seeds`. Printed: the sweep table, the ablation table (start, final, best, mean over evaluations,
steps to start + gain, training reward), and diagnostics that explain the differences: the implicit
reward's group std (std_s), beta(x) median and the gradient norm, early and late in training.
Runs are real `gift-train` runs, cached by folder (rerunning the script only adds what is missing).

Run: python bench/gift_ablations.py [--variants default not_detached ...] [--lrs 5e-5 1e-4 3e-4]
     [--seeds 1 2 3] [--steps 120] [--out runs/bench_ablations]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from convergence import mean_std, save_figure  # bench/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "default": [],  # conf/algo/gift.yaml
    "not_detached": ["algo.detach_stats=false"],
    "floor_0.01": ["algo.implicit_std_floor=0.01"],
    "floor_0.1": ["algo.implicit_std_floor=0.1"],
    "floor_4": ["algo.implicit_std_floor=4.0"],
    "baseline_proximal": ["algo.baseline=proximal"],
    "length_norm": ["algo.length_norm_power=1.0"],
    "z_scale_0.5": ["algo.z_scale=0.5"],
    "z_scale_2": ["algo.z_scale=2.0"],
    "ref_refresh_20": ["algo.reference_refresh_every=20"],
    "skip_uninformative": ["algo.skip_uninformative_groups=true"],
    "grpo": ["algo=grpo"],
}
DIAGNOSTICS = ("implicit_std_median", "log_beta_median", "grad_norm")


def run(out: Path, variant: str, lr: float, seed: int, steps: int, eval_every: int) -> list[dict]:
    run_dir = out / f"{variant}_lr{lr:g}_seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    done = metrics.exists() and any(json.loads(x)["step"] == steps for x in metrics.read_text().splitlines())
    if not done:
        cmd = [sys.executable, "-m", "gift_megatron.train", *VARIANTS[variant], f"optim.lr={lr}", f"seed={seed}",
               f"num_steps={steps}", f"eval_every={eval_every}", f"save_every={steps}", f"run_dir={run_dir}",
               "resume=false"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{variant} lr={lr} seed={seed} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in metrics.read_text().splitlines()]


def evals(rows: list[dict]) -> list[float]:
    return [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]


def auc(rows: list[dict]) -> float:
    """Mean held-out accuracy over the evaluations after step 0."""
    return statistics.mean(evals(rows)[1:])


def _window(rows: list[dict], key: str, lo: int, hi: int) -> float:
    xs = [r[key] for r in rows if key in r and lo < r["step"] <= hi]
    return statistics.mean(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1e-4, 3e-4])
    ap.add_argument("--sweep-seed", type=int, default=1)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--gain", type=float, default=0.03)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ablations")
    a = ap.parse_args()

    sweep = {v: {lr: run(a.out, v, lr, a.sweep_seed, a.steps, a.eval_every) for lr in a.lrs} for v in a.variants}
    print(f"lr sweep (seed {a.sweep_seed}, {a.steps} steps): mean held-out accuracy over evaluations after step 0")
    print("variant | " + " | ".join(f"lr {lr:g}" for lr in a.lrs) + " | best lr")
    best = {}
    for v, by_lr in sweep.items():
        best[v] = max(a.lrs, key=lambda lr: auc(by_lr[lr]))
        print(f"{v} | " + " | ".join(f"{auc(by_lr[lr]):.3f}" for lr in a.lrs) + f" | {best[v]:g}")

    results = {v: [run(a.out, v, best[v], s, a.steps, a.eval_every) for s in a.seeds] for v in a.variants}
    print(f"\nablations at each variant's best lr, {len(a.seeds)} seeds, held-out greedy accuracy, mean +- std")
    print(f"variant | lr | start | final | best | mean over evals | steps to start+{a.gain:g} | train reward (last 10)")
    for v, runs in results.items():
        reach = [next((r["step"] for r in rows if r.get("eval_accuracy", -1) >= evals(rows)[0] + a.gain
                       and r["step"] > 0), None) for rows in runs]
        hit = [x for x in reach if x is not None]
        reached = f"{statistics.mean(hit):.0f} ({len(hit)}/{len(reach)})" if hit else f"never (0/{len(reach)})"
        reward = [statistics.mean(r["reward"] for r in rows if "reward" in r and r["step"] > a.steps - 10)
                  for rows in runs]
        cells = [mean_std([f(evals(rows)) for rows in runs]) for f in (lambda e: e[0], lambda e: e[-1], max)]
        print(f"{v} | {best[v]:g} | " + " | ".join(cells) + f" | {mean_std([auc(r) for r in runs])} | {reached} | "
              f"{mean_std(reward)}")

    half = a.steps // 2
    print(f"\ndiagnostics (mean over seeds): steps 1-10 -> steps {half + 1}-{a.steps}")
    print("variant | " + " | ".join(DIAGNOSTICS))
    for v, runs in results.items():
        cells = []
        for key in DIAGNOSTICS:
            early = statistics.mean(_window(rows, key, 0, 10) for rows in runs)
            late = statistics.mean(_window(rows, key, half, a.steps) for rows in runs)
            cells.append(f"{early:.3g} -> {late:.3g}")
        print(f"{v} | " + " | ".join(cells))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for v, runs in results.items():
        steps = [r["step"] for r in runs[0] if "eval_accuracy" in r]
        acc = np.array([evals(rows) for rows in runs])
        axes[0].plot(steps, acc.mean(0), label=f"{v} (lr {best[v]:g})")
        axes[0].fill_between(steps, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.15)
        std_s = [[_window(rows, "implicit_std_median", s - 10, s) for s in range(10, a.steps + 1, 10)] for rows in runs]
        axes[1].plot(range(10, a.steps + 1, 10), np.array(std_s).mean(0), label=v)
    axes[0].set(xlabel="step", ylabel="held-out accuracy", title="accuracy, mean +- std over seeds")
    axes[1].set(xlabel="step", ylabel="implicit reward group std (std_s)", title="std_s (10-step means)",
                yscale="log")
    save_figure(fig, axes, a.out / "ablations.png")

if __name__ == "__main__":
    main()
