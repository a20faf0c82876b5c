"""Checkpoints with megatron-core dist_checkpointing: written atomically, resumed exactly.

Layout under a run's `checkpoints/` folder: `step_00000042/` per completed checkpoint. A save
writes into `.tmp_step_00000042/`, then `manifest.json` (size and SHA-256 of every file, hashed by all
ranks in parallel), and is renamed only after that, so a crash mid-save leaves the previous
checkpoints intact and the half-written folder is never loaded (the next start removes it). The
newest `keep_last` checkpoints are kept. On resume (`select_checkpoint`) the newest checkpoint whose
files match their manifest is chosen: a corrupted or truncated newer one is named and skipped.

What is saved: the policy's model chunks (sharded, so a model can be loaded into another TP/PP
layout), the distributed optimizer state ('dp_reshardable': same TP/PP layout to resume), the LR
schedule, every rank's RNG states, and the trainer's own state (step, data position, ...).
"""

from __future__ import annotations

import errno
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from gift_megatron.faults import maybe_fail
from gift_megatron.manifest import (
    CorruptCheckpoint,
    check_files,
    checkpoint_files,
    digest_files,
    fsync_dir,
    no_manifest,
    read_manifest,
    unlisted_files,
    write_manifest,
)

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d{8})$")
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_keys(chunks) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_sharded_state(chunks) -> dict[str, Any]:
    return {key: _unwrap(c).sharded_state_dict() for key, c in zip(_model_keys(chunks), chunks)}


def _rng_state() -> ShardedObject:
    ps = parallel_state
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _ensure_adam_state(optimizer) -> None:
    """Give torch Adam a state before its first step (step 0, zero moments: what its first step
    would create). Without apex/TE, megatron's DistributedOptimizer.state_dict reads the 'step' of
    every parameter state, both to save at step 0 and to build the template for loading."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _restore_adam_step(optimizer, optimizer_state) -> None:
    """torch Adam keeps `step` per parameter. megatron saves it in the param groups, restores it,
    and then overwrites it with the per-bucket 'step' of the load template (not a sharded tensor,
    so never read from the file). Put the saved step back."""
    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = optimizer_state if len(opts) > 1 else [optimizer_state]
    for opt, state in zip(opts, states):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        if not steps:
            continue
        assert len(steps) == 1, steps
        step = float(steps.pop())
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(step)


REFERENCE = "reference."  # key prefix of the reference's tensors, saved when it is not the frozen initial policy


def _full_sharded_state(policy, trainer_state: dict, *, is_loading: bool, reference=None) -> dict[str, Any]:
    _ensure_adam_state(policy.optimizer)  # on load, the template needs it too; the loaded state replaces it
    sd = model_sharded_state(policy.chunks)
    for key, chunk in zip(_model_keys(reference or []), reference or []):
        sd[REFERENCE + key] = _unwrap(chunk).sharded_state_dict(prefix=REFERENCE)
    sd["optimizer"] = policy.optimizer.sharded_state_dict(dict(sd), is_loading=is_loading,
                                                          metadata=OPTIMIZER_SHARDING)
    sd["scheduler"] = policy.scheduler.state_dict()
    sd["rng_state"] = _rng_state()
    sd["trainer"] = trainer_state
    return sd


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def completed_checkpoints(root: Path) -> list[Path]:
    """Completed checkpoints under `root`, oldest first (temporary folders never count)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(root: Path) -> Path | None:
    done = completed_checkpoints(root)
    return done[-1] if done else None


def _on_rank0(fn, *args) -> None:
    if dist.get_rank() == 0:
        fn(*args)
    dist.barrier()


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _broadcast_json(obj=None):
    """rank 0's JSON-able `obj` on every rank (as bytes in a tensor: no pickle crosses the group)."""
    rank, world = _world()
    if world == 1:
        return obj
    data = json.dumps(obj).encode() if rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.long)
    dist.broadcast(size, 0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == 0 else torch.empty(int(size),
                                                                                            dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return json.loads(buf.numpy().tobytes().decode())


def _all_gather_json(obj) -> list:
    """Every rank's JSON-able `obj`, in rank order, on every rank."""
    rank, world = _world()
    if world == 1:
        return [obj]
    data = json.dumps(obj).encode()
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.long))
    longest = max(int(n) for n in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # JSON text is never empty
    bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, mine)
    return [json.loads(b[:int(n)].numpy().tobytes().decode()) for b, n in zip(bufs, sizes)]


def write_checkpoint_manifest(folder: Path) -> float:
    """Collective: every rank flushes to disk and digests its share of the folder's files; rank 0
    writes manifest.json. Returns the seconds it took."""
    start, (rank, world) = time.perf_counter(), _world()
    names = _broadcast_json(checkpoint_files(folder) if rank == 0 else None)
    parts = _all_gather_json(digest_files(folder, names[rank::world], fsync=True))
    if rank == 0:
        write_manifest(folder, {k: v for part in parts for k, v in part.items()})
    if world > 1:
        dist.barrier()
    return time.perf_counter() - start


STATE = "state.json"  # in every training checkpoint: the run state written with it, cross-checked on load


def checkpoint_problems(folder: Path) -> list[str]:
    """Collective: what is wrong with a checkpoint's files ([] when it verifies: a manifest, every file it
    lists present and matching, no file it does not list). Each rank digests a share."""
    rank, world = _world()
    found = None
    if rank == 0:
        try:
            entries = read_manifest(folder)
            found = ({"entries": entries, "problems": unlisted_files(folder, entries)} if entries is not None
                     else {"entries": {}, "problems": [no_manifest(folder)]})
        except CorruptCheckpoint as e:
            found = {"entries": {}, "problems": [str(e)]}
    found = _broadcast_json(found)
    entries = found["entries"]
    parts = _all_gather_json(check_files(folder, entries, sorted(entries)[rank::world]))
    return found["problems"] + [p for part in parts for p in part]


def read_state(path: Path) -> dict | None:
    """A training checkpoint's state.json (step, optimizer steps, sampler, finiteness, ...); None without one."""
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, ValueError):
        return None


def _state_problems(path: Path) -> list[str]:
    """Rank 0: a verified training checkpoint whose state.json is missing, disagrees with its name, or
    says its weights are not finite (never resumed)."""
    state = read_state(path)
    if state is None:
        return [f"{path / STATE}: missing or unreadable (every training checkpoint has one)"]
    step = int(_STEP_DIR.match(path.name).group(1))
    if state.get("step") != step:
        return [f"{path / STATE}: says step {state.get('step')}, the folder {step}"]
    return [] if state.get("weights_finite", True) else [f"{path}: its weights are not finite (NaN/Inf)"]


def select_checkpoint(root: Path) -> Path | None:
    """Collective: the newest checkpoint under `root` that verifies (its manifest and its state.json)
    and whose weights are finite, or None when there is none. Newer ones are
    skipped with a warning naming each problem and renamed aside (`abandoned-step_N-...`), so that they
    never count again; when every checkpoint is skipped, an error (starting over silently would discard
    the run). Leftovers of an interrupted write are removed first."""
    rank, _ = _world()
    if rank == 0:
        _remove_leftovers(Path(root))
    found = [str(p) for p in completed_checkpoints(root)] if rank == 0 else None
    skipped = []
    for path in map(Path, reversed(_broadcast_json(found))):
        problems = checkpoint_problems(path)
        if rank == 0 and not problems:
            problems = _state_problems(path)
        if not _broadcast_json(problems):
            if skipped and rank == 0:
                log.warning("resuming from %s, the newest checkpoint that verifies, instead of %s", path,
                            ", ".join(d.name for d in skipped))
                for bad in skipped:
                    _abandon(bad)
            return path
        skipped.append(path)
        if rank == 0:
            log.warning("checkpoint %s is skipped:\n  %s", path, "\n  ".join(problems))
    if skipped:
        raise CorruptCheckpoint(
            f"no checkpoint under {root} can be resumed ({', '.join(d.name for d in skipped)}; see the warnings "
            f"above): restore them from a copy, sign one you trust (python tools/verify_checkpoint.py --sign DIR), "
            f"or start over in another folder (run_dir=...) or with resume=false move_old_run=true (moves the old "
            f"run aside)")
    return None


def _abandon(path: Path) -> None:
    """Rename a checkpoint that a resume skipped: kept for inspection, never loaded or counted again."""
    target = path.with_name(f"abandoned-{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(target)
    log.warning("renamed %s to %s: the run goes on from an older checkpoint (delete it when you no longer need it)",
                path, target.name)


def _remove_leftovers(root: Path) -> None:
    for stale in sorted(root.glob(".tmp_step_*")) + sorted(root.glob(".old_step_*")):
        log.warning("removing %s: an unfinished checkpoint write (the run was killed or the disk was full)", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _prepare_tmp(tmp: Path) -> None:
    for stale in tmp.parent.glob(".tmp_step_*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    _replace_dir(tmp, final)
    maybe_fail("checkpoint_prune", int(final.name.removeprefix("step_")))  # published, not yet pruned
    for old in retired(completed_checkpoints(final.parent), keep_last):
        shutil.rmtree(old, ignore_errors=True)


def _good(path: Path) -> bool:
    """Finite weights, and the step's update was not skipped for a NaN/Inf (model-only checkpoints count)."""
    state = read_state(path)
    return state is None or (state.get("weights_finite", False) and not state.get("update_skipped", False))


def retired(checkpoints: list[Path], keep_last: int) -> list[Path]:
    """The checkpoints retention deletes (oldest first in, all of one run): all but the newest
    `keep_last`, except the newest good one (finite weights, update applied), which a run of NaN steps
    never displaces."""
    keep = set(checkpoints[-keep_last:])
    good = [p for p in checkpoints if _good(p)]
    if good:
        keep.add(good[-1])
    return [p for p in checkpoints if p not in keep]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the previous ones are intact)."""


def _no_space(error: BaseException, root: Path, need: int) -> bool:
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return shutil.disk_usage(root).free < max(need, 16 << 20)  # the writers' own errors do not say (torch's zip)


def _space_message(root: Path, need: int, written: int = 0) -> str:
    free = shutil.disk_usage(root).free
    needs = (f"about {need:,} bytes (the size of the previous checkpoint)" if need
             else f"more than the {written:,} bytes it wrote")
    return (f"no space left on {root}: a checkpoint needs {needs}, {free:,} bytes are free. Free space there or "
            f"set run_dir on a larger filesystem (keep_last_checkpoints bounds how many are kept); the previous "
            f"checkpoints are intact, and the unfinished write is removed at the next start")


def weights_finite(chunks) -> bool:
    """Collective: whether every rank's weights are all finite (one read of the weights)."""
    bad = torch.tensor([any(not torch.isfinite(p).all() for c in chunks for p in c.parameters())], dtype=torch.long)
    if _world()[1] > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def save_checkpoint(root: Path, step: int, policy, trainer_state: dict, keep_last: int = 2, reference=None,
                    rank0_files: dict | None = None, run_state: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. `reference`: chunks saved too
    (a reference that changes during training, e.g. refreshed from the policy). `rank0_files`: name ->
    fn(path) that writes it, run on rank 0 into the unpublished folder (in the manifest like the rest).
    `run_state`: what the trainer cross-checks on load (optimizer steps, sampler, ...), written as
    state.json with the step and whether the weights are finite (retention and resume read it)."""
    root, final = Path(root), step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    rank, world = _world()
    previous = latest_checkpoint(root) if rank == 0 else None
    need = _folder_bytes(previous) if previous is not None else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    fits = torch.tensor([rank != 0 or shutil.disk_usage(root).free >= need], dtype=torch.long)
    if world > 1:
        dist.broadcast(fits, 0)
    if not fits.item():  # checked before writing: a full disk mid-write gives the writers' obscure errors
        raise CheckpointWriteError(_space_message(root, need))
    summary = dict(run_state or {}, step=step, weights_finite=weights_finite(policy.chunks))
    _on_rank0(_prepare_tmp, tmp)
    state = dict(trainer_state, step=step, has_reference=reference is not None)
    start = time.perf_counter()
    maybe_fail("checkpoint_data", step)
    try:
        dist_checkpointing.save(_full_sharded_state(policy, state, is_loading=False, reference=reference), str(tmp))
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if not isinstance(e, KeyboardInterrupt | SystemExit) and _no_space(e, root, need):
            raise CheckpointWriteError(_space_message(root, need, _folder_bytes(tmp))) from e
        raise
    files = dict(rank0_files or {}, **{STATE: lambda path: path.write_text(json.dumps(summary, indent=1))})
    for name, write in files.items() if rank == 0 else ():
        write(tmp / name)
    dist.barrier()
    saved_s = time.perf_counter() - start
    maybe_fail("kill_during_checkpoint_write", step)  # tests: shards written, no manifest, not yet published
    digest_s = write_checkpoint_manifest(tmp)
    maybe_fail("checkpoint_publish", step)  # manifest written, not yet renamed into place
    _on_rank0(_publish, tmp, final, keep_last)
    if rank == 0:
        log.info("saved checkpoint %s (write %.2f s, digests %.2f s)", final, saved_s, digest_s)
    return final


ARCHITECTURE = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights")


def architecture(model) -> dict:
    """The model fields a checkpoint's tensors depend on (saved with it, compared on resume)."""
    return {k: getattr(model, k) for k in ARCHITECTURE if hasattr(model, k)}


def check_architecture(model, path: Path) -> None:
    """Raise, naming the differing fields, when `path` was written for another model than `model`."""
    saved, mine = read_trainer_state(path).get("architecture"), architecture(model)
    if saved is not None and saved != mine:
        diff = ", ".join(f"{k}: checkpoint {saved.get(k)}, run {mine.get(k)}" for k in sorted(set(saved) | set(mine))
                         if saved.get(k) != mine.get(k))
        raise ValueError(f"{path} was written for another model ({diff}): use the model it was trained with, "
                         f"another run_dir, or resume=false move_old_run=true to start over (the old run is moved "
                         f"aside)")


def read_trainer_state(path: Path) -> dict:
    """The trainer state saved with a checkpoint (no tensors loaded): e.g. to check it fits the run."""
    return dist_checkpointing.load_common_state_dict(str(path)).get("trainer", {})


def verify_checkpoint(path: Path, fix: str) -> None:
    """Collective: raise CorruptCheckpoint naming every problem checkpoint_problems finds (no manifest,
    a file missing, changed or not listed). `fix` ends the message."""
    problems = checkpoint_problems(path)
    if problems:
        raise CorruptCheckpoint(f"checkpoint {path} is damaged:\n  " + "\n  ".join(problems) + f"\n{fix}")


@torch.no_grad()  # the optimizer copies into (views of) fp32 parameters that require grad
def load_checkpoint(path: Path, policy, reference=None, verify: bool = True) -> dict:
    """Restore model, optimizer, LR schedule and RNG states in place (and the reference's weights when
    given); returns the trainer state. `verify`: check the files against the manifest first (off when
    select_checkpoint just did)."""
    path = Path(path)
    if not _STEP_DIR.match(path.name) or not (path / "metadata.json").exists():
        raise ValueError(f"{path} is not a completed checkpoint (expected a step_XXXXXXXX folder written by "
                         f"save_checkpoint): pass a folder listed by completed_checkpoints()")
    if verify:
        verify_checkpoint(path, "load an older checkpoint of the run (resume picks the newest intact one)")
    if reference is not None and not read_trainer_state(path).get("has_reference"):
        raise ValueError(f"{path} holds no reference weights (it was written by a run whose reference was the "
                         f"frozen initial policy): resume it with algo.reference_refresh_every=0")
    state = dist_checkpointing.load(_full_sharded_state(policy, {}, is_loading=True, reference=reference), str(path))
    for key, chunk in zip(_model_keys(policy.chunks), policy.chunks):
        _unwrap(chunk).load_state_dict(state[key])
    for key, chunk in zip(_model_keys(reference or []), reference or []):
        loaded = state[REFERENCE + key]
        _unwrap(chunk).load_state_dict({k.removeprefix(REFERENCE): v for k, v in loaded.items()})
    policy.optimizer.load_state_dict(state["optimizer"])
    _restore_adam_step(policy.optimizer, state["optimizer"])
    policy.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng_state"])
    _cross_check(path, policy, state["trainer"])
    return state["trainer"]


def _adam_steps(optimizer) -> set[int]:
    return {int(s["step"]) for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for s in opt.optimizer.state.values() if "step" in s}


def _cross_check(path: Path, policy, trainer: dict) -> None:
    """The parts of a step boundary that are written apart agree: state.json's step and sampler with the
    trainer state's, its count of applied optimizer steps with the LR schedule's and Adam's. A mismatch
    (a checkpoint taken inside a step, or assembled from two) refuses the checkpoint, naming it."""
    summary, wrong = read_state(path), []
    if summary is None:
        raise CorruptCheckpoint(f"{path} has no {STATE}: it cannot be cross-checked (not written by save_checkpoint)")
    if summary.get("step") != trainer.get("step"):
        wrong.append(f"step: {STATE} {summary.get('step')}, trainer state {trainer.get('step')}")
    if "sampler" in summary and summary["sampler"] != trainer.get("sampler"):
        wrong.append(f"sampler: {STATE} {summary['sampler']}, trainer state {trainer.get('sampler')}")
    if "optimizer_steps" in summary:
        steps = summary["optimizer_steps"]
        if policy.scheduler.num_steps != steps:
            wrong.append(f"optimizer steps: {STATE} {steps}, LR schedule {policy.scheduler.num_steps}")
        if (adam := _adam_steps(policy.optimizer)) and adam != {steps}:
            wrong.append(f"optimizer steps: {STATE} {steps}, Adam {sorted(adam)}")
    if wrong:
        raise CorruptCheckpoint(f"{path} is not the state at one step boundary ({'; '.join(wrong)}): resume from an "
                                f"older checkpoint (move this one away)")


@torch.no_grad()
def load_model_weights(path: Path, chunks) -> None:
    """Only the model weights, into chunks of ANY TP/PP layout (dist_checkpointing reshards); the files
    are checked against the manifest first."""
    verify_checkpoint(path, "delete it to rebuild it (a cached warm-up is retrained; a converted checkpoint "
                            "comes from tools/hf_to_mcore.py again)")
    state = dist_checkpointing.load(model_sharded_state(chunks), str(path))
    for key, chunk in zip(_model_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(state[key])


def save_model_weights(path: Path, chunks) -> Path:
    """Model-only dist checkpoint (e.g. the cached warm-up), written atomically like save_checkpoint."""
    path = Path(path)
    tmp = path.parent / f".tmp_{path.name}"
    _on_rank0(_prepare_tmp_dir, tmp)
    dist_checkpointing.save(model_sharded_state(chunks), str(tmp))
    dist.barrier()
    write_checkpoint_manifest(tmp)
    _on_rank0(_replace_dir, tmp, path)
    return path


def _prepare_tmp_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Renames only (atomic on one filesystem): the checkpoint appears complete or not at all, and an
    existing one of the same name is moved aside before, and deleted after, the new one is in place."""
    old = final.parent / f".old_{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)  # the rename itself survives a power cut
    shutil.rmtree(old, ignore_errors=True)
