"""Print a run's history: one line per start (segment) with the step it started at, when, where, the
source commit, and every change of what the run trains that the user allowed (resume_allow_changes).

    python tools/run_history.py runs/gift            # the run folder
    python tools/run_history.py runs/gift --config   # with each segment's full config (JSON)
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_megatron.run_dir import HISTORY, read_history  # noqa: E402


def describe(segment: dict) -> str:
    algo = segment["config"].get("algo", {}).get("name")
    commit = (segment.get("git_commit") or "unknown")[:10]
    line = (f"segment {segment['segment']}: from step {segment['start_step']}, {segment['time']} on "
            f"{segment['host']}, commit {commit}, algo {algo}")
    for key, (old, new) in segment["changes"].items():
        line += f"\n  changed {key}: {old!r} -> {new!r}"
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--config", action="store_true", help="print each segment's resolved config too")
    args = ap.parse_args(argv)
    history = read_history(args.run_dir)
    if not history:
        print(f"{args.run_dir}: no {HISTORY} (not a run folder, or written before run histories)")
        return 1
    for segment in history:
        print(describe(segment))
        if args.config:
            print(json.dumps(segment["config"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
