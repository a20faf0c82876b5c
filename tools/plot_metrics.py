"""Plot a run's metrics.jsonl as PNG curves: reward and held-out accuracy, beta(x), mismatch, timing.

    python tools/plot_metrics.py runs/default/metrics.jsonl [--out runs/default/metrics.png]
    python tools/plot_metrics.py runs/gift/metrics.jsonl runs/grpo/metrics.jsonl --out compare.png
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gift_megatron.metrics_log import read_metrics  # noqa: E402

PANELS = [("reward", "training reward"), ("eval_accuracy", "held-out accuracy (greedy)"),
          ("log_beta_median", "log beta(x) median (p10-p90 band)"), ("logprob_diff_max", "max |vLLM - trainer| logp"),
          ("grad_norm", "grad norm"), ("time_generate", "seconds per phase")]


def load(path: Path) -> list[dict]:
    return read_metrics(path)  # a torn line is named and left out, not a crash


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if key == "time_generate":
                for phase in ("time_generate", "time_reference", "time_train", "time_sync"):
                    p = [(r["step"], r[phase]) for r in rows if phase in r]
                    if p:
                        ax.plot(*zip(*p), label=f"{name} {phase[5:]}")
                continue
            if pts:
                ax.plot(*zip(*pts), label=name, marker="o" if key == "eval_accuracy" else None)
            if key == "log_beta_median":
                band = [(r["step"], r["log_beta_p10"], r["log_beta_p90"]) for r in rows if "log_beta_p10" in r]
                if band:
                    s, lo, hi = zip(*band)
                    ax.fill_between(s, lo, hi, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files (one per run)")
    ap.add_argument("--out", default=None, help="PNG path (default: metrics.png beside the first file)")
    a = ap.parse_args()
    paths = [Path(p) for p in a.metrics]
    runs = {p.parent.name: load(p) for p in paths}
    out = Path(a.out) if a.out else paths[0].with_suffix(".png")
    plot(runs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
