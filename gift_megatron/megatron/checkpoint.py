"""Checkpoints with megatron-core dist_checkpointing: written atomically, resumed exactly.

Layout under a run's `checkpoints/` folder: `step_00000042/` per completed checkpoint. A save
writes into `.tmp_step_00000042/` and is renamed only after every rank has finished, so a crash
mid-save leaves the previous checkpoints intact and the half-written folder is never loaded (it is
removed by the next save). The newest `keep_last` checkpoints are kept.

What is saved: the policy's model chunks (sharded, so a model can be loaded into another TP/PP
layout), the distributed optimizer state ('dp_reshardable': same TP/PP layout to resume), the LR
schedule, every rank's RNG states, and the trainer's own state (step, data position, ...).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

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


def _prepare_tmp(tmp: Path) -> None:
    for stale in tmp.parent.glob(".tmp_step_*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, keep_last: int) -> None:
    _replace_dir(tmp, final)
    for old in completed_checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(root: Path, step: int, policy, trainer_state: dict, keep_last: int = 2, reference=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. `reference`: chunks saved too
    (a reference that changes during training, e.g. refreshed from the policy)."""
    root, final = Path(root), step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    _on_rank0(_prepare_tmp, tmp)
    state = dict(trainer_state, step=step, has_reference=reference is not None)
    dist_checkpointing.save(_full_sharded_state(policy, state, is_loading=False, reference=reference), str(tmp))
    dist.barrier()
    _on_rank0(_publish, tmp, final, keep_last)
    log.info("saved checkpoint %s", final)
    return final


def read_trainer_state(path: Path) -> dict:
    """The trainer state saved with a checkpoint (no tensors loaded): e.g. to check it fits the run."""
    return dist_checkpointing.load_common_state_dict(str(path)).get("trainer", {})


@torch.no_grad()  # the optimizer copies into (views of) fp32 parameters that require grad
def load_checkpoint(path: Path, policy, reference=None) -> dict:
    """Restore model, optimizer, LR schedule and RNG states in place (and the reference's weights when
    given); returns the trainer state."""
    path = Path(path)
    if not _STEP_DIR.match(path.name) or not (path / "metadata.json").exists():
        raise ValueError(f"{path} is not a completed checkpoint (expected a step_XXXXXXXX folder written by "
                         f"save_checkpoint): pass a folder listed by completed_checkpoints()")
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
    return state["trainer"]


@torch.no_grad()
def load_model_weights(path: Path, chunks) -> None:
    """Only the model weights, into chunks of ANY TP/PP layout (dist_checkpointing reshards)."""
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
    shutil.rmtree(old, ignore_errors=True)
