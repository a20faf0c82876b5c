"""One vLLM server of the embedded default's model, started as Slurm starts them
(`python -m gift_megatron.rollout.serve`) and shared by many trainer runs (`rollout.server_urls`):
a server starts in ~35 s on 2 cores, a trainer run that reuses it only syncs its weights in.

    with SharedServer(tmp_dir) as server:
        subprocess.run([..., "rollout=vllm_servers", *server.overrides], env=server.env(...))

`overrides` must not change the model's architecture or context (the server holds that model).
One server per process (`shared_server`): pytest modules that need one share it, and it stops at exit.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from gift_megatron.launch import free_port
from gift_megatron.rollout.auth import SECRET_ENV, new_secret

ROOT = Path(__file__).resolve().parents[1]


class SharedServer:
    def __init__(self, folder: Path, timeout_s: float = 600.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.secret, self.log = free_port(8300), new_secret(), folder / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gift_megatron.rollout.serve", "--port", str(self.port), "--",
               f"run_dir={folder}"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=dict(os.environ, OMP_NUM_THREADS="1", **{SECRET_ENV: self.secret}))
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"shared vLLM server did not start; {self.log}:\n{self.log.read_text()[-3000:]}")
            time.sleep(1.0)

    @property
    def overrides(self) -> list[str]:
        return ["rollout=vllm_servers", f"rollout.server_urls=[{self.url}]"]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a trainer that uses the server: its secret (never on a command line)."""
        return dict(os.environ, **{SECRET_ENV: self.secret}, **extra)

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its engine process (own session)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> SharedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_SHARED: SharedServer | None = None


def shared_server(folder: Path, fresh: bool = False) -> SharedServer:
    """This process's one server (started in `folder` on first use, or again with `fresh`: a run that synced
    non-finite weights leaves a vLLM-CPU server answering HTTP 400 after later syncs), stopped at exit."""
    global _SHARED
    if _SHARED is not None and (fresh or _SHARED.proc.poll() is not None):
        _SHARED.stop()
        _SHARED = None
    if _SHARED is None:
        _SHARED = SharedServer(folder)
        atexit.register(_SHARED.stop)
    return _SHARED
