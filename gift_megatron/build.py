"""Build the trainer's components from the typed config.

Every trainer rank builds the policy (and reference); global rank 0 also owns the task, the
rewards and the rollout engine: the in-process vLLM engine (one-process runs) or a pool of vLLM
servers, started here on this machine or given by URL (Slurm starts them on their own nodes).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gift_megatron.config import Config, ParallelConfig
from gift_megatron.convert.hf_config import hf_config_from_model
from gift_megatron.convert.safetensors_io import HFWriter
from gift_megatron.launch import free_port
from gift_megatron.megatron.checkpoint import (
    check_architecture,
    load_model_weights,
    save_model_weights,
    select_checkpoint,
)
from gift_megatron.megatron.conversion import write_preset
from gift_megatron.megatron.model import build_gpt_models
from gift_megatron.megatron.parallel import init_distributed, init_model_parallel
from gift_megatron.megatron.policy import build_policy, build_reference, copy_weights, move_chunks
from gift_megatron.megatron.warmup import pad_sequences, supervised_warmup
from gift_megatron.megatron.weight_sync import gather_hf_weights
from gift_megatron.rollout.data import PromptSampler, load_prompts
from gift_megatron.rollout.rewards import GroupScorer, build_reward
from gift_megatron.rollout.tasks import Sample, TaskData, addition_problems, corpus
from gift_megatron.rollout.tokenizer import BOS, EOS, PAD, train_char_tokenizer
from gift_megatron.trainer import Components

log = logging.getLogger(__name__)
_SINGLE = ParallelConfig(world_size=1, micro_batch_size=1)
WARMUP_CACHE_ENV = "GIFT_WARMUP_CACHE"  # one warm-up cache for every run of a machine (data.warmup_cache_dir wins)


def _on_gpu(cfg: Config) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def _addition_task(cfg: Config, run_dir: Path) -> TaskData:
    train, held_out = addition_problems(cfg.data.seed, cfg.data.num_eval_prompts)
    tok = train_char_tokenizer(run_dir / "tokenizer", corpus(train + held_out))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    samples = lambda ps: [Sample([BOS] + enc(p.prompt), enc(p.answer), p.answer, p.prompt) for p in ps]  # noqa: E731
    return TaskData(samples(train), samples(held_out), EOS, PAD, tok)


def _file_task(cfg: Config) -> TaskData:
    """JSONL/Parquet prompts; held out: data.eval_path, else the first num_eval_prompts after a seeded shuffle."""
    from transformers import AutoTokenizer

    d = cfg.data
    tok = AutoTokenizer.from_pretrained(d.tokenizer)
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer={d.tokenizer} has no EOS token: completions could never stop")

    def load(path):
        rows = load_prompts(path, tok, prompt_field=d.prompt_field, answer_field=d.answer_field,
                            use_chat_template=d.use_chat_template, max_prompt_length=d.max_prompt_length)
        return [Sample(p.prompt_ids, tok.encode(p.answer, add_special_tokens=False), p.answer, p.text) for p in rows]

    rows = load(d.path)
    if d.eval_path:
        train, held_out = rows, load(d.eval_path)
    else:
        if not 0 <= d.num_eval_prompts < len(rows):
            raise ValueError(f"data.num_eval_prompts={d.num_eval_prompts} must be in [0, {len(rows)}) for {d.path}, "
                             f"which has {len(rows)} rows (0: no evaluation; or give data.eval_path)")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(d.seed)).tolist()
        held_out, train = [rows[i] for i in order[:d.num_eval_prompts]], [rows[i] for i in order[d.num_eval_prompts:]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TaskData(train, held_out, tok.eos_token_id, pad, tok)


def build_task(cfg: Config, run_dir: Path) -> TaskData:
    task = _addition_task(cfg, run_dir) if cfg.data.name == "addition" else _file_task(cfg)
    if len(task.tokenizer) > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {len(task.tokenizer)} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}: use the model's own tokenizer (data.tokenizer)")
    return task


def warmup_cache_path(cfg: Config, cache_root: Path) -> Path:
    d = cfg.data
    files = [] if d.name == "addition" else [d.name, d.path, d.eval_path, d.tokenizer, d.prompt_field,
                                             d.answer_field, d.use_chat_template, d.max_prompt_length]
    key = json.dumps([dataclasses.asdict(cfg.model), d.seed, d.num_eval_prompts, d.warmup_target_accuracy,
                      d.warmup_max_steps, d.warmup_lr, d.warmup_batch_size, cfg.seed, *files], sort_keys=True,
                     default=str)
    return cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]


def train_warmup(cfg: Config, task: TaskData, path: Path, on_gpu: bool) -> None:
    """Supervised warm-up of a one-process model (prompt -> answer + EOS); weights saved to `path`."""
    (model,) = build_gpt_models(cfg.model, _SINGLE, on_gpu=on_gpu)
    pairs = lambda ss: pad_sequences([s.prompt_ids for s in ss], [s.answer_ids + [task.eos_id] for s in ss],  # noqa: E731
                                     task.pad_id)
    stats = supervised_warmup(model, pairs(task.train), pairs(task.eval), vocab_size=cfg.model.vocab_size,
                              lr=cfg.data.warmup_lr, batch_size=cfg.data.warmup_batch_size,
                              max_steps=cfg.data.warmup_max_steps, target_accuracy=cfg.data.warmup_target_accuracy,
                              seed=cfg.seed)
    log.info("warm-up done: %s", stats)
    save_model_weights(path, [model])
    (path.parent / f"{path.name}.json").write_text(json.dumps(stats))


def _warmup_in_subprocess(run_dir: Path, path: Path) -> None:
    """A multi-rank run's warm-up: one process of its own (its own one-rank world), while the ranks wait."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID",
                                                              "SLURM_NTASKS", "SLURM_LOCALID", "PMI_RANK",
                                                              "PMI_SIZE", "OMPI_COMM_WORLD_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    subprocess.run([sys.executable, "-m", "gift_megatron.build", str(run_dir / "config.yaml"), str(path)], env=env,
                   check=True)


def init_weights(cfg: Config, run_dir: Path, task: TaskData | None, on_gpu: bool) -> Path | None:
    """model.init_checkpoint, else the cached warm-up (trained now if missing), else None (random init)."""
    if cfg.model.init_checkpoint:
        return Path(cfg.model.init_checkpoint)
    if cfg.data.warmup_max_steps == 0:
        return None
    if task is not None and not task.eval:
        raise ValueError("the supervised warm-up stops at a held-out accuracy, but there are no held-out prompts: "
                         "set data.num_eval_prompts > 0 (or data.eval_path), or start from model.init_checkpoint")
    root = cfg.data.warmup_cache_dir or os.environ.get(WARMUP_CACHE_ENV) or run_dir.parent / ".warmup_cache"
    path = warmup_cache_path(cfg, Path(root))
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f"{path.name}.lock", "w") as lock:  # concurrent runs (sweeps) train it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "metadata.json").exists():
                if dist.get_world_size() == 1:
                    train_warmup(cfg, task, path, on_gpu)
                else:
                    _warmup_in_subprocess(run_dir, path)
    dist.barrier()
    log.info("initial weights: %s", path)
    return path


def write_hf_folder(hf_dir: Path, cfg: Config, weights, task: TaskData, *, with_weights: bool):
    """The current policy as an HF folder (config, tokenizer and, `with_weights`, safetensors): what
    vLLM starts from. Streams `weights` either way; returns their (name, dtype, shape) in order."""
    meta = []
    writer = HFWriter(hf_dir) if with_weights else None
    for name, tensor in weights:
        meta.append((name, tensor.dtype, tuple(tensor.shape)))
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
    hf_dir.mkdir(parents=True, exist_ok=True)
    tok = task.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else task.eos_id
    (hf_dir / "config.json").write_text(json.dumps({**hf_config_from_model(cfg.model), "eos_token_id": task.eos_id,
                                                    "bos_token_id": bos, "pad_token_id": task.pad_id}))
    tok.save_pretrained(str(hf_dir))
    return meta


def _engine(cfg: Config, hf_dir: Path, task: TaskData, run_dir: Path, meta: list):
    if cfg.rollout.engine == "vllm":
        from gift_megatron.rollout.engine import LocalEngine

        return LocalEngine(hf_dir, cfg.rollout, seed=cfg.seed, max_model_len=cfg.model.max_position_embeddings,
                           stop_token_ids=[task.eos_id], dtype=cfg.model.params_dtype)
    from gift_megatron.rollout.servers import ServerPool, VLLMServer, wait_all_ready
    from gift_megatron.rollout.weight_transfer import WeightTransfer, backend_for

    r, backend = cfg.rollout, backend_for(cfg.rollout.weight_sync, _on_gpu(cfg))
    servers: list = []
    try:
        if not r.server_urls:
            ports: list[int] = []  # free ones from base_port up: a busy port would answer /health for someone else
            for i in range(r.num_servers):
                ports.append(free_port(r.base_port, r.host, exclude=tuple(ports)))
                servers.append(VLLMServer(hf_dir, ports[-1], r, seed=cfg.seed + i, transfer_backend=backend,
                                          dtype=cfg.model.params_dtype, max_model_len=cfg.model.max_position_embeddings,
                                          log_dir=run_dir / "logs"))
        wait_all_ready(servers, r.server_start_timeout_s)
        urls = r.server_urls or [s.url for s in servers]
        transfer = None
        if backend:  # servers given by URL must have been started with --weight-transfer-config (slurm/)
            address = r.weight_transfer_address or os.environ.get("MASTER_ADDR", "127.0.0.1")
            transfer = WeightTransfer(backend, urls, [r.tensor_parallel_size] * len(urls), meta,
                                      master_address=address, master_port=free_port(), timeout_s=r.request_timeout_s)
        pool = ServerPool(urls, r, stop_token_ids=[task.eos_id], sync_dir=run_dir / ".weight_sync",
                          owned_servers=servers, transfer=transfer)
        if r.server_urls:
            pool.wait_healthy(r.server_start_timeout_s)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return pool


def build(cfg: Config) -> Components:
    run_dir = Path(cfg.run_dir)
    on_gpu = _on_gpu(cfg)
    info = init_distributed(cfg.parallel, on_gpu)
    rank0 = info.rank == 0
    # Which checkpoint to resume, checked before anything is written or trained: a run_dir that holds
    # another model's checkpoints keeps its config.yaml / model.yaml (tools/mcore_to_hf.py reads them).
    resume_from = select_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    if resume_from is not None:
        check_architecture(cfg.model, resume_from)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        write_preset(cfg.model, run_dir / "model.yaml")  # tools/mcore_to_hf.py finds it for run checkpoints
    init_model_parallel(cfg.parallel, cfg.seed, on_gpu)
    task = build_task(cfg, run_dir) if rank0 else None
    init = init_weights(cfg, run_dir, task, on_gpu)
    policy = build_policy(cfg, on_gpu=on_gpu, total_optimizer_steps=cfg.num_steps * cfg.algo.num_mini_batches)
    if init is not None:
        load_model_weights(init, policy.chunks)
    reference = None
    if cfg.algo.needs_reference:
        reference = build_reference(cfg, on_gpu=on_gpu)
        copy_weights(policy.chunks, reference)
        if cfg.parallel.offload_reference:
            move_chunks(reference, "cpu")
    weights = gather_hf_weights(policy.chunks, cfg.model)  # a collective: every rank takes part
    engine = scorer = writer = None
    if rank0:
        # Servers given by URL start from their own weights and get ours by sync: write no copy for them.
        meta = write_hf_folder(run_dir / "hf_policy", cfg, weights, task, with_weights=not cfg.rollout.server_urls)
        engine = _engine(cfg, run_dir / "hf_policy", task, run_dir, meta)
        reward = build_reward(cfg.reward, task=cfg.data.name, eos_id=task.eos_id, decode=task.decode)
        scorer = GroupScorer(reward, cfg.reward.num_workers)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    num_train = torch.tensor([len(task.train) if rank0 else 0])
    dist.broadcast(num_train, 0)
    components = Components(cfg=cfg, policy=policy, reference=reference, engine=engine, task=task, scorer=scorer,
                            sampler=PromptSampler(int(num_train), cfg.data.seed), run_dir=run_dir, writer=writer,
                            rank0=rank0, resume_from=resume_from)
    if cfg.rollout.server_urls:  # servers started elsewhere hold other weights: sync ours in
        from gift_megatron.trainer import sync_weights

        sync_weights(components)
    return components


def _warmup_main(config_yaml: str, path: str) -> None:
    """`python -m gift_megatron.build RUN_DIR/config.yaml CACHE_PATH`: the warm-up for a multi-rank run."""
    from gift_megatron.config import Config as Schema

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Schema), OmegaConf.load(config_yaml)))
    on_gpu = _on_gpu(cfg)
    init_distributed(_SINGLE, on_gpu)
    init_model_parallel(_SINGLE, cfg.seed, on_gpu)
    train_warmup(cfg, build_task(cfg, Path(cfg.run_dir)), Path(path), on_gpu)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    _warmup_main(*sys.argv[1:3])
