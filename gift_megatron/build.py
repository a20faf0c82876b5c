"""Wire a run's parts from the typed config; each part is built from its own sub-config elsewhere:
process groups (megatron/parallel.py), the task (rollout/tasks.py), initial weights (a checkpoint or
the cached supervised warm-up, megatron/warmup.py), policy and reference (megatron/policy.py), the
engine (rollout/startup.py) and the rollout stage (rollout/stage.py, global rank 0 only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gift_megatron.config import Config
from gift_megatron.megatron.checkpoint import check_architecture, load_model_weights, read_state, select_checkpoint
from gift_megatron.megatron.conversion import write_preset
from gift_megatron.megatron.parallel import init_distributed, init_model_parallel
from gift_megatron.megatron.policy import Policy, build_policy, build_reference, copy_weights, move_chunks
from gift_megatron.megatron.warmup import initial_weights
from gift_megatron.megatron.weight_sync import gather_hf_weights
from gift_megatron.rollout.ahead import RolloutsAhead
from gift_megatron.rollout.data import PromptSampler
from gift_megatron.rollout.rewards import GroupScorer, build_reward
from gift_megatron.rollout.stage import RolloutStage
from gift_megatron.rollout.startup import start_engine, write_hf_folder
from gift_megatron.rollout.tasks import TaskData, build_task
from gift_megatron.run_dir import RunLock, changed_meaning, meaning, record_segment, refused_changes
from gift_megatron.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


def build(cfg: Config, lock: RunLock | None = None) -> Trainer:
    """`lock`: run_dir's, held by global rank 0 (run_dir.claim_run_dir); the trainer releases it at close."""
    run_dir, on_gpu = Path(cfg.run_dir), cfg.on_gpu
    rank0 = init_distributed(cfg.parallel, on_gpu).rank == 0
    # Which checkpoint to resume, checked before anything is written or trained: a run_dir that holds
    # another model's checkpoints keeps its config.yaml / model.yaml (tools/mcore_to_hf.py reads them).
    resume_from = select_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    changes = {}
    if resume_from is not None:
        check_architecture(cfg.model, resume_from)
        changes = check_meaning(resume_from, meaning(config), cfg.resume_allow_changes)
    if rank0:
        record_segment(run_dir, read_state(resume_from)["step"] if resume_from else 0, config, changes)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        write_preset(cfg.model, run_dir / "model.yaml")  # tools/mcore_to_hf.py finds it for run checkpoints
    init_model_parallel(cfg.parallel, cfg.seed, on_gpu)
    task = build_task(cfg.data, cfg.model.vocab_size, run_dir) if rank0 else None
    init = initial_weights(cfg, run_dir, task)
    policy = build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=on_gpu,
                          total_optimizer_steps=cfg.num_steps * cfg.algo.num_mini_batches)
    if init is not None:
        load_model_weights(init, policy.chunks)
    reference = None
    if cfg.algo.needs_reference:
        reference = build_reference(cfg.model, cfg.parallel, on_gpu=on_gpu)
        copy_weights(policy.chunks, reference)
        if cfg.parallel.offload_reference:
            move_chunks(reference, "cpu")
    meta = _initial_hf_folder(cfg, policy, run_dir, task)
    num_train = torch.tensor([len(task.train) if rank0 else 0])
    dist.broadcast(num_train, 0)
    sampler_args = int(num_train), cfg.data.seed
    sampler = PromptSampler(*sampler_args)
    rollouts = None
    if rank0:
        engine = start_engine(cfg, run_dir / "hf_policy", task, run_dir, meta)
        scorer = GroupScorer(build_reward(cfg.reward, task=cfg.data.name, eos_id=task.eos_id, decode=task.decode),
                             cfg.reward.num_workers)
        # the stage's own sampler: with rollouts ahead it runs ahead of the trained steps' (TrainState's)
        rollouts = RolloutStage(cfg.algo, cfg.rollout, engine, task, scorer, PromptSampler(*sampler_args),
                                num_prompts=cfg.data.num_prompts_per_step, seed=cfg.seed)
        if cfg.rollout.max_staleness:
            rollouts = RolloutsAhead(rollouts, cfg.rollout.max_staleness)
            if cfg.rollout.verify_every == 1:
                log.warning("rollout.max_staleness=%d with rollout.verify_every=1: every step checks the engine on "
                            "the batch generated with its weights, so every update waits for generation and the "
                            "overlap is lost; rollout.verify_every=10 keeps most of it (docs/scaling.md)",
                            cfg.rollout.max_staleness)
    trainer = Trainer(cfg, policy, reference, rollouts, TrainState(sampler), run_dir, resume_from, meaning(config),
                      lock)
    if cfg.rollout.server_urls:  # servers started elsewhere hold other weights: sync ours in
        trainer.sync_weights(0)
    return trainer


def _initial_hf_folder(cfg: Config, policy: Policy, run_dir: Path, task: TaskData | None) -> list | None:
    """Collective: the policy gathered into rank 0's HF folder, what vLLM starts from (servers given by URL
    start from their own weights and get ours by sync: no copy is written for them); returns the
    tensors' (name, dtype, shape) on rank 0. Rank 0 consumes the gather lazily while writing and every
    other rank waits in it until then, so the two are one call: no other collective can come between."""
    weights = gather_hf_weights(policy.chunks, cfg.model)
    if task is None:  # not rank 0: its part was sent inside the gather
        return None
    return write_hf_folder(run_dir / "hf_policy", cfg.model, weights, task, with_weights=not cfg.rollout.server_urls)


def check_meaning(resume_from: Path, now: dict, allowed: list[str]) -> dict[str, tuple]:
    """The changes of what the run trains since `resume_from` (allowed ones, to record); raises naming
    the fields a resume may not change without `resume_allow_changes`."""
    changes = changed_meaning(read_state(resume_from).get("meaning", {}), now)
    refused = refused_changes(changes, allowed)
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        sections = ",".join(sorted({k.split(".")[0] for k in refused}))
        raise ValueError(f"resuming {resume_from} would change what the run trains ({listed}): resume with the run's "
                         f"settings, start a new run in another folder (run_dir=...), or allow the change "
                         f"explicitly with resume_allow_changes=[{sections}] (recorded in run_history.jsonl; "
                         f"python tools/run_history.py {resume_from.parents[1]} prints it)")
    return changes

