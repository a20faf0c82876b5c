#!/usr/bin/env bash
# Run the test suite; pytest's exit 5 ("no tests collected") is a failure here, not a pass.
# Two workers, a test file per worker at a time (--dist loadfile): most tests spend their time
# starting processes and servers, so two files overlap well on 2 cores; files that start vLLM
# servers take ports from distinct ranges (8000 Slurm, 8100 trainer, 8300 pool tests, 9400 faults).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -n 2 --dist loadfile --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
