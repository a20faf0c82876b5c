"""Single-node launcher whose ranks listen on loopback only (torchrun's listen on every interface).

torchrun's rendezvous store is a TCPStore, and a TCPStore server listens on all interfaces whatever
--master-addr says; torchrun cannot be handed a socket bound elsewhere. Here the launcher binds the
store's socket to 127.0.0.1 itself and gives it to TCPStore (`master_listen_fd`); the ranks join that
store as clients (TORCHELASTIC_USE_AGENT_STORE=True, as under torchrun: with env:// rank 0 then opens
no store of its own), and gloo binds the loopback interface (GLOO_SOCKET_IFNAME=lo unless set).
SIGINT/SIGTERM/SIGUSR1 are forwarded to every rank; when a rank fails the others are stopped
(SIGTERM, SIGKILL after a grace period) and the launcher exits with the first failing rank's code.
Multi-node runs need the node network: use torchrun or srun there and firewall MASTER_PORT.

    python -m gift_megatron.launch_local --nproc 2 -- parallel=tp2 rollout=vllm_servers rollout.num_servers=1
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import torch.distributed as dist

from gift_megatron.launch import listening_socket

HOST = "127.0.0.1"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STOP_GRACE_S = 30.0


def rank_env(rank: int, nproc: int, port: int, env: dict[str, str]) -> dict[str, str]:
    """The environment torchrun would give rank `rank`, with the store and gloo on loopback."""
    env = dict(env, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR=HOST, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # share the cores
    return env


def exit_code(returncode: int) -> int:
    """A shell's exit code for a child's returncode (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def stop(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the ranks still running, SIGKILL those still alive after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def supervise(procs: list[subprocess.Popen]) -> int:
    """Wait for every rank; on the first failure stop the others. Returns the first failing rank's
    exit code, or 0."""
    running = list(procs)
    while running:
        for p in list(running):
            if p.poll() is None:
                continue
            running.remove(p)
            if p.returncode != 0:
                stop(running)
                return exit_code(p.returncode)
        time.sleep(0.2)
    return 0


def launch(nproc: int, argv: list[str], module: str = "gift_megatron.train") -> int:
    """Run `python -m module *argv` on `nproc` local ranks around a loopback-only store."""
    sock = listening_socket(HOST)
    port = sock.getsockname()[1]
    # the store owns the socket from here (it closes the descriptor)
    store = dist.TCPStore(HOST, port, None, True, wait_for_workers=False, master_listen_fd=sock.detach())
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        for rank in range(nproc):  # own sessions, as torchrun's: a terminal's Ctrl-C arrives once, forwarded
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv],
                                          env=rank_env(rank, nproc, port, os.environ), start_new_session=True))
        return supervise(procs)
    finally:
        stop(procs)
        del store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gift_megatron.launch_local", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, required=True, help="ranks to start on this machine")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then gift-train's arguments")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    overrides = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    sys.exit(launch(args.nproc, overrides))


if __name__ == "__main__":
    main()
