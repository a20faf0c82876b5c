"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint folder, written last.

A checkpoint is published (renamed into place) only after its `manifest.json` is written, so a
published folder whose files disagree with its manifest was changed afterwards: a truncated copy, a
flipped block on disk, an overwritten shard. `check_files` names each such file. Pure Python (no
torch): `tools/verify_checkpoint.py` uses it without importing megatron.

Hashing is split across ranks by the caller (gift_megatron.megatron.checkpoint): each rank digests
`files[rank::world]`, which it has usually just written and still holds in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
VERSION = 1


class CorruptCheckpoint(ValueError):
    """A checkpoint's files disagree with its manifest (or it has none where one is required)."""


def checkpoint_files(folder: Path) -> list[str]:
    """Every regular file under `folder` (relative, sorted) except the manifest itself."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_digest(path: Path, fsync: bool = False) -> str:
    with open(path, "rb") as f:
        if fsync:  # on disk before the manifest vouches for it (a power cut after publishing loses nothing)
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_files(folder: Path, names: list[str], fsync: bool = False) -> dict[str, dict]:
    """{name: {"bytes": size, "sha256": hex}} for `names` under `folder` (`fsync`: flushed to disk first)."""
    folder = Path(folder)
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": file_digest(folder / n, fsync)} for n in names}


def write_manifest(folder: Path, entries: dict[str, dict]) -> Path:
    """manifest.json written atomically (temporary file, fsync, rename, fsync of the folder)."""
    folder = Path(folder)
    path, tmp = folder / MANIFEST, folder / f".{MANIFEST}.tmp"
    body = {"version": VERSION, "algorithm": "sha256", "files": dict(sorted(entries.items()))}
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    fsync_dir(folder)
    return path


def fsync_dir(folder: Path) -> None:
    """Make the renames inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """The manifest's entries; None when the folder has none (written before manifests existed)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if body.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{path} is unreadable ({e}): the checkpoint cannot be verified") from None
    return files


def check_files(folder: Path, entries: dict[str, dict], names: list[str]) -> list[str]:
    """Problems of the files `names` (a subset of the manifest's) under `folder`, one line each."""
    folder, problems = Path(folder), []
    for name in names:
        want, path = entries[name], Path(folder) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "longer than written"
            problems.append(f"{path}: {what} ({size} bytes, the manifest says {want['bytes']})")
        elif file_digest(path) != want["sha256"]:
            problems.append(f"{path}: content differs from its digest (corrupted after it was written)")
    return problems


def unlisted_files(folder: Path, entries: dict[str, dict]) -> list[str]:
    """Problems for the files on disk that the manifest does not list (added after it was written)."""
    extra = sorted(set(checkpoint_files(folder)) - set(entries))
    return [f"{Path(folder) / n}: not in the manifest (added after the checkpoint was written)" for n in extra]


def no_manifest(folder: Path) -> str:
    return (f"{folder}: no {MANIFEST}, so it cannot be verified (an unfinished write, or an edit that removed it). "
            f"If you trust this checkpoint, sign it explicitly: python tools/verify_checkpoint.py --sign {folder}")


def verify_folder(folder: Path) -> list[str]:
    """Every problem of one checkpoint folder (single process: the command-line verifier): no manifest,
    a listed file missing or different, a file on disk the manifest does not list."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        return [no_manifest(folder)]
    return check_files(folder, entries, sorted(entries)) + unlisted_files(folder, entries)


def sign_folder(folder: Path) -> Path:
    """Write a manifest for the files a folder holds now: the user vouches for them (the command-line
    verifier's --sign). Never called by the trainer."""
    folder = Path(folder)
    return write_manifest(folder, digest_files(folder, checkpoint_files(folder), fsync=True))
