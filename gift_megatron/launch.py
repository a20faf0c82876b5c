"""Run a function on N local processes joined by a real gloo process group (as torchrun would).

Used by the tests and benchmarks to exercise collectives on one CPU machine; the trainer itself
is launched by torchrun or srun.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port(start: int | None = None, host: str = "127.0.0.1", exclude: tuple[int, ...] = ()) -> int:
    """A TCP port nobody listens on. Without `start`, the kernel's pick (an ephemeral port); with it,
    the first bindable port at or above `start` (not in `exclude`), for servers: ports below the
    ephemeral range are never taken as the source port of someone's outgoing connection."""
    if start is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    for port in range(start, min(start + 1000, 65536)):
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {start}..{start + 999} on {host}: choose another rollout.base_port")


def is_loopback(host: str) -> bool:
    """True for `localhost` and the loopback addresses (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a hostname
        return False


def listening_socket(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to `host` only and listening: for torch's TCPStore(master_listen_fd=...),
    whose own socket listens on every interface whatever host it is given."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    sock.listen(1024)
    return sock


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # share the cores fairly
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():  # an in-process vLLM engine's shutdown may already have destroyed it
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # The result is on disk: run the exit handlers (they stop helper processes, e.g. the Manager that
    # megatron's checkpoint writer spawns), then skip the interpreter's teardown, where gloo threads
    # still held by megatron's cached process groups can abort the process ("terminate called without
    # an active exception", seen once in CI) and turn finished work into a failure.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` processes; returns each rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
