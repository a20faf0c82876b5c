"""Build the trainer's components from the typed config (the embedded default's task included)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gift_megatron.config import Config
from gift_megatron.convert.hf_config import hf_config_from_model
from gift_megatron.convert.safetensors_io import HFWriter
from gift_megatron.megatron.checkpoint import load_model_weights, save_model_weights
from gift_megatron.megatron.conversion import write_preset
from gift_megatron.megatron.model import build_gpt_models
from gift_megatron.megatron.parallel import init_distributed, init_model_parallel
from gift_megatron.megatron.policy import build_policy, build_reference, copy_weights
from gift_megatron.megatron.warmup import pad_sequences, supervised_warmup
from gift_megatron.megatron.weight_sync import gather_hf_weights
from gift_megatron.rollout.data import PromptSampler
from gift_megatron.rollout.engine import LocalEngine
from gift_megatron.rollout.tasks import addition_problems, corpus
from gift_megatron.rollout.tokenizer import BOS, EOS, PAD, train_char_tokenizer
from gift_megatron.trainer import Components, TaskData

log = logging.getLogger(__name__)


def _on_gpu(cfg: Config) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def _task(cfg: Config, run_dir: Path) -> tuple[TaskData, object]:
    if cfg.data.name != "addition":
        raise ValueError(f"data.name={cfg.data.name}: gift-train runs the embedded addition task so far; JSONL/"
                         f"Parquet prompts load with gift_megatron.rollout.data but are not wired into the loop yet")
    train, held_out = addition_problems(cfg.data.seed, cfg.data.num_eval_prompts)
    tok = train_char_tokenizer(run_dir / "tokenizer", corpus(train + held_out))
    if len(tok) > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but model.vocab_size={cfg.model.vocab_size}")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    task = TaskData([[BOS] + enc(p.prompt) for p in train], [enc(p.answer) for p in train],
                    [[BOS] + enc(p.prompt) for p in held_out], [enc(p.answer) for p in held_out], EOS, PAD)
    return task, tok


def _warmup_weights(cfg: Config, task: TaskData, on_gpu: bool, cache_root: Path) -> Path:
    """The warmed-up weights, trained once per (model, task, warm-up settings) and cached."""
    d = cfg.data
    key = json.dumps([dataclasses.asdict(cfg.model), d.seed, d.num_eval_prompts, d.warmup_target_accuracy,
                      d.warmup_max_steps, d.warmup_lr, d.warmup_batch_size, cfg.seed], sort_keys=True, default=str)
    path = cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "metadata.json").exists():
        log.info("warm-up: cached weights %s", path)
        return path
    (model,) = build_gpt_models(cfg.model, cfg.parallel, on_gpu=on_gpu)
    answers = lambda a: [x + [task.eos_id] for x in a]  # noqa: E731
    train = pad_sequences(task.train_prompts, answers(task.train_answers), task.pad_id)
    held = pad_sequences(task.eval_prompts, answers(task.eval_answers), task.pad_id)
    stats = supervised_warmup(model, train, held, vocab_size=cfg.model.vocab_size, lr=d.warmup_lr,
                              batch_size=d.warmup_batch_size, max_steps=d.warmup_max_steps,
                              target_accuracy=d.warmup_target_accuracy, seed=cfg.seed)
    log.info("warm-up done: %s", stats)
    save_model_weights(path, [model])
    (path.parent / f"{path.name}.json").write_text(json.dumps(stats))
    return path


def _engine(cfg: Config, policy_chunks, tok, run_dir: Path) -> LocalEngine:
    """An HF folder of the current policy for vLLM to start from, then the in-process engine."""
    hf_dir = run_dir / "hf_policy"
    writer = HFWriter(hf_dir)
    for name, tensor in gather_hf_weights(policy_chunks, cfg.model):
        writer.add(name, tensor)
    writer.close()
    (hf_dir / "config.json").write_text(json.dumps({**hf_config_from_model(cfg.model), "eos_token_id": EOS,
                                                    "bos_token_id": BOS, "pad_token_id": PAD}))
    tok.save_pretrained(str(hf_dir))
    return LocalEngine(hf_dir, cfg.rollout, seed=cfg.seed, max_model_len=cfg.model.max_position_embeddings,
                       stop_token_ids=[EOS])


def build(cfg: Config) -> Components:
    if cfg.parallel.world_size != 1:
        raise ValueError("gift-train with the in-process vLLM engine runs one trainer process: set "
                         "parallel=single (multi-rank runs use rollout=vllm_servers, wired with the Slurm job)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
    write_preset(cfg.model, run_dir / "model.yaml")  # tools/mcore_to_hf.py finds it for run checkpoints
    on_gpu = _on_gpu(cfg)
    init_distributed(cfg.parallel, on_gpu)
    init_model_parallel(cfg.parallel, cfg.seed, on_gpu)
    task, tok = _task(cfg, run_dir)
    init = cfg.model.init_checkpoint or _warmup_weights(cfg, task, on_gpu, run_dir.parent / ".warmup_cache")
    policy = build_policy(cfg, on_gpu=on_gpu, total_optimizer_steps=cfg.num_steps * cfg.algo.num_mini_batches)
    load_model_weights(init, policy.chunks)
    reference = None
    if cfg.algo.needs_reference:
        reference = build_reference(cfg, on_gpu=on_gpu)
        copy_weights(policy.chunks, reference)
    engine = _engine(cfg, policy.chunks, tok, run_dir)
    from torch.utils.tensorboard import SummaryWriter

    return Components(cfg=cfg, policy=policy, reference=reference, engine=engine, task=task,
                      sampler=PromptSampler(len(task.train_prompts), cfg.data.seed), run_dir=run_dir,
                      writer=SummaryWriter(str(run_dir / "tb")))
