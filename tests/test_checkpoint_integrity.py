"""Checkpoint integrity: a manifest of per-file digests written with every checkpoint (by every rank's
share), checked before a load; a damaged newest checkpoint is skipped for the newest intact one; a
full disk is named with the folder and the bytes; the command-line verifier. Real megatron-core
checkpoints on gloo; a real full filesystem (a small tmpfs)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tests.mcore_workers as W
from gift_megatron.launch import run_distributed
from gift_megatron.manifest import (
    MANIFEST,
    CorruptCheckpoint,
    checkpoint_files,
    digest_files,
    read_manifest,
    verify_folder,
    write_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
VERIFY = [sys.executable, str(ROOT / "tools" / "verify_checkpoint.py")]


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.distcp").write_bytes(os.urandom(10_000))
    (d / "common.pt").write_bytes(b"x" * 300)
    (d / "sub" / "b").write_bytes(b"")  # an empty file is a file too
    write_manifest(d, digest_files(d, checkpoint_files(d)))
    return d


def test_manifest_names_every_kind_of_damage(tmp_path):
    d = _folder(tmp_path)
    assert sorted(read_manifest(d)) == ["a.distcp", "common.pt", "sub/b"] and verify_folder(d) == []
    with open(d / "a.distcp", "r+b") as f:  # same size, other bytes: only the digest can tell
        f.seek(4000)
        f.write(bytes(255 - b for b in (d / "a.distcp").read_bytes()[4000:4100]))
    os.truncate(d / "common.pt", 100)
    (d / "sub" / "b").unlink()
    (d / "late.distcp").write_bytes(b"1")
    assert verify_folder(d) == [f"{d}/a.distcp: content differs from its digest (corrupted after it was written)",
                                f"{d}/common.pt: truncated (100 bytes, the manifest says 300)",
                                f"{d}/sub/b: missing",
                                f"{d}/late.distcp: not in the manifest (added after the checkpoint was written)"]
    (d / MANIFEST).write_text('{"version": 1, "files": ')  # a torn manifest is named, never trusted
    with pytest.raises(CorruptCheckpoint, match=r"manifest.json is unreadable"):
        read_manifest(d)


def test_command_line_verifier(tmp_path):
    good, bad = _folder(tmp_path / "good"), _folder(tmp_path / "bad")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metadata.json").write_text("{}")  # a checkpoint from before manifests
    ok = subprocess.run([*VERIFY, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith(f"OK         {good}"), ok.stdout + ok.stderr
    os.truncate(bad / "a.distcp", 10)
    out = subprocess.run([*VERIFY, str(good), str(bad), str(tmp_path / "old"), str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].startswith("OK ") and lines[1] == f"DAMAGED    {bad}"
    assert lines[2] == f"  {bad}/a.distcp: truncated (10 bytes, the manifest says 10000)"
    assert lines[3].startswith(f"UNVERIFIED {tmp_path / 'old'}: no manifest.json")
    assert f"--sign {tmp_path / 'old'}" in lines[3]  # the explicit way to trust it
    assert lines[4].startswith(f"{tmp_path / 'nothing'}: no checkpoint here")


def _records() -> list:
    seen: list = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    logging.getLogger("gift_megatron").addHandler(handler)
    logging.getLogger("gift_megatron").setLevel(logging.INFO)
    return seen


def _save_worker(rank, world, root):
    from gift_megatron.megatron.checkpoint import save_checkpoint

    cfg = W.make_config(world)
    policy = W.setup(cfg)
    save_checkpoint(root, 1, policy, {"data_position": 1})
    W.train(policy, cfg, W.local_batch(cfg))
    save_checkpoint(root, 2, policy, {"data_position": 2})
    return {}


def _resume_worker(rank, world, root):
    import torch.distributed as dist

    from gift_megatron.megatron.checkpoint import load_checkpoint, load_model_weights, select_checkpoint

    seen, out = _records(), {}
    policy = W.setup(W.make_config(world))
    for name, load in [("direct", lambda p: load_checkpoint(p, policy)),
                       ("weights", lambda p: load_model_weights(p, policy.chunks))]:
        try:
            load(Path(root) / "step_00000002")
        except CorruptCheckpoint as e:
            out[name] = str(e)
    chosen = select_checkpoint(root)  # skips step 2 and renames it aside
    out["chosen"] = chosen.name
    out["state"] = load_checkpoint(chosen, policy, verify=False)["data_position"]
    if rank == 0:
        os.truncate(Path(root) / "step_00000001" / "common.pt", 50)
    dist.barrier()
    try:
        select_checkpoint(root)
    except CorruptCheckpoint as e:
        out["none_left"] = str(e)
    out["logged"] = seen
    return out


def test_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    run_distributed(_save_worker, 2, str(root))
    step1, step2 = root / "step_00000001", root / "step_00000002"
    for ckpt in (step1, step2):  # both ranks' shares were digested: every file, each matching
        assert sorted(read_manifest(ckpt)) == checkpoint_files(ckpt) and verify_folder(ckpt) == []
    shards = sorted(step2.glob("*.distcp"), key=lambda p: p.stat().st_size)
    assert len(shards) >= 2  # one per rank at least
    with open(shards[-1], "r+b") as f:  # 4 KiB of random bytes inside the biggest shard, size unchanged
        f.seek(shards[-1].stat().st_size // 2)
        f.write(os.urandom(4096))
    (root / ".tmp_step_00000003").mkdir()  # an interrupted write: removed at the next start

    out = run_distributed(_resume_worker, 2, str(root))
    assert [o["chosen"] for o in out] == ["step_00000001"] * 2 and [o["state"] for o in out] == [1, 1]
    warned = "\n".join(out[0]["logged"])
    assert f"checkpoint {step2} is skipped:\n  {shards[-1]}: content differs from its digest" in warned
    assert f"resuming from {step1}, the newest checkpoint that verifies, instead of step_00000002" in warned
    # the skipped one is kept for inspection under a name that is never loaded or counted again
    assert f"renamed {step2} to abandoned-step_00000002-" in warned and not step2.exists()
    assert [p.name for p in root.glob("abandoned-step_00000002-*")]
    assert "removing" in warned and ".tmp_step_00000003" in warned and not (root / ".tmp_step_00000003").exists()
    assert not [m for m in out[1]["logged"] if "checkpoint" in m or "removing" in m]  # rank 1 agrees silently
    for o in out:
        assert f"checkpoint {step2} is damaged:\n  {shards[-1]}: content differs" in o["direct"]
        assert "load an older checkpoint" in o["direct"]
        assert f"{shards[-1]}: content differs" in o["weights"] and "delete it to rebuild it" in o["weights"]
        assert f"no checkpoint under {root} can be resumed (step_00000001;" in o["none_left"]
        assert "verify_checkpoint.py --sign" in o["none_left"] and "move_old_run=true" in o["none_left"]
    assert f"{step1}/common.pt: truncated (50 bytes" in "\n".join(out[0]["logged"])


def _mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _disk_full_worker(rank, world, tmp):
    from gift_megatron.megatron.checkpoint import CheckpointWriteError, save_checkpoint, select_checkpoint

    tmp, out = Path(tmp), {}
    policy = W.setup(W.make_config(world))
    size = sum(p.stat().st_size for p in save_checkpoint(tmp / "roomy", 1, policy, {}).rglob("*") if p.is_file())
    out["size"] = size
    small = tmp / "small"
    _mount_tmpfs(small, size // 2)  # the first checkpoint does not fit: the writers fail mid-way
    try:
        try:
            save_checkpoint(small, 1, policy, {})
        except CheckpointWriteError as e:
            out["mid_write"] = str(e)
        out["left_behind"] = sorted(p.name for p in small.iterdir())
        out["after_restart"] = (select_checkpoint(small), sorted(p.name for p in small.iterdir()))
    finally:
        subprocess.run(["umount", str(small)], check=True)
    _mount_tmpfs(small, size * 3 // 2)  # one fits, a second does not: refused before writing
    try:
        save_checkpoint(small, 1, policy, {})
        try:
            save_checkpoint(small, 2, policy, {})
        except CheckpointWriteError as e:
            out["before_write"] = str(e)
        out["kept"] = sorted(p.name for p in small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)
    return out


def test_a_full_disk_is_named_with_the_folder_and_bytes_and_the_partial_write_removed(tmp_path):
    (out,) = run_distributed(_disk_full_worker, 1, str(tmp_path))
    small = tmp_path / "small"
    assert out["mid_write"].startswith(f"no space left on {small}: a checkpoint needs more than "), out
    assert "the previous checkpoints are intact" in out["mid_write"]
    assert out["left_behind"] == [".tmp_step_00000001"]
    assert out["after_restart"] == (None, [])
    assert out["before_write"].startswith(f"no space left on {small}: a checkpoint needs about {out['size']:,} bytes")
    assert out["kept"] == ["step_00000001"]  # nothing half-written beside it


def _unverifiable_worker(rank, world, root):
    """Four checkpoints, each unusable in its own way but the first: step 2's weights are NaN, step 3 lost
    its manifest, step 4 holds a file its manifest does not list. keep_last=1 when step 2 is saved:
    retention must still keep step 1, the newest good one."""
    import torch

    from gift_megatron.megatron.checkpoint import save_checkpoint, select_checkpoint

    root = Path(root)
    policy = W.setup(W.make_config(world))
    save_checkpoint(root, 1, policy, {}, keep_last=1)
    with torch.no_grad():
        next(policy.chunks[0].parameters()).view(-1)[0] = float("nan")
    save_checkpoint(root, 2, policy, {}, keep_last=1, run_state={"update_skipped": False})
    kept = sorted(p.name for p in root.iterdir())
    with torch.no_grad():
        next(policy.chunks[0].parameters()).view(-1)[0] = 0.0
    save_checkpoint(root, 3, policy, {}, keep_last=4)  # (with keep_last=1, step 3, finite, would retire 1)
    save_checkpoint(root, 4, policy, {}, keep_last=4)
    (root / "step_00000003" / MANIFEST).unlink()
    (root / "step_00000004" / "extra.pt").write_bytes(b"added later")
    seen = _records()
    chosen = select_checkpoint(root)
    return {"kept_after_nan": kept, "kept": sorted(p.name for p in root.iterdir()), "chosen": chosen.name,
            "logged": "\n".join(seen)}


def test_resume_loads_only_what_verifies_and_retention_keeps_the_newest_good_checkpoint(tmp_path):
    """No unverified load: a missing manifest or an unlisted file makes a checkpoint not intact (before: a
    missing manifest was loaded "unverified", an unlisted file with no warning); non-finite weights are
    never resumed, and never displace the newest finite checkpoint under retention (before: pruned)."""
    root = tmp_path / "checkpoints"
    out = run_distributed(_unverifiable_worker, 1, str(root))[0]
    assert out["kept_after_nan"] == ["step_00000001", "step_00000002"]  # keep_last=1, yet step 1 stays
    assert out["chosen"] == "step_00000001"
    logged = out["logged"]
    assert f"{root}/step_00000004/extra.pt: not in the manifest" in logged
    assert f"{root}/step_00000003: no manifest.json, so it cannot be verified" in logged
    assert f"--sign {root}/step_00000003" in logged
    assert f"{root}/step_00000002: its weights are not finite" in logged
    # the skipped ones are kept under names that never load or count again; step 1 is where the run goes on
    assert [n.split("-")[1] for n in out["kept"] if n.startswith("abandoned-")] == \
        ["step_00000002", "step_00000003", "step_00000004"]
    assert "step_00000001" in out["kept"]
    # a user who trusts one signs it explicitly, and then it verifies
    lost = next(root.glob("abandoned-step_00000003-*"))
    signed = subprocess.run([*VERIFY, "--sign", str(lost)], capture_output=True, text=True, timeout=60)
    assert signed.returncode == 0 and signed.stdout.startswith(f"was: {lost}: no manifest.json"), signed.stdout
    assert verify_folder(lost) == [] and not (lost / ".gift.lock").exists()
