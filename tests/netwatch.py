"""The TCP sockets a process tree listens on, read from /proc (Linux): /proc/net/tcp{,6} gives each
listening socket's address and inode, /proc/PID/fd which process holds it."""

import ipaddress
import os
import subprocess
import threading
from pathlib import Path


def _address(hex_addr: str) -> str:
    """/proc/net/tcp's local address ("0100007F" or 32 hex digits: 32-bit words in host byte order)."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                addr, port = fields[1].split(":")
                found[fields[9]] = (_address(addr), int(port, 16))
    return found


def _tree(root: int) -> list[int]:
    """root and its descendants (by parent PID, so children in their own sessions count too)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def listening(root: int) -> set[tuple[int, str, int]]:
    """(pid, address, port) of the TCP sockets that `root` and its descendants listen on now."""
    inodes, found = _listening_inodes(), set()
    for pid in _tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found.add((pid, *inodes[target[8:-1]]))
    return found


def run_recording_listeners(cmd: list[str], timeout: float, interval_s: float = 0.3, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs), polling what its
    process tree listens on while it runs. Returns (CompletedProcess, root PID, every (pid, address,
    port) seen)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    seen: set[tuple[int, str, int]] = set()
    done = threading.Event()

    def poll() -> None:
        while not done.wait(interval_s):
            seen.update(listening(proc.pid))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    finally:
        done.set()
        watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), proc.pid, seen
