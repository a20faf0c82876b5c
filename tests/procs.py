"""Failure messages for subprocess runs: the output's tail, then every distinct error line last, so a
truncated CI log still shows the cause (a torchrun summary alone hides which exception a rank raised)."""

import re
import subprocess

_ERROR = re.compile(r"^\s*(\[rank\d+\]:?\s*)?[\w.]*(Error|Exception|Exit)\b(:.*)?$")


def explain(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    text = (proc.stdout or "") + (proc.stderr or "")
    errors = dict.fromkeys(line.strip() for line in text.splitlines() if _ERROR.match(line))
    return f"exit {proc.returncode}\n--- output tail ---\n{text[-tail:]}\n--- error lines ---\n" + "\n".join(errors)
