"""Start a run's rollout engine (rank 0): the policy as an HF folder, then the in-process vLLM engine
or a pool of vLLM servers (started here on this machine, or given by URL: Slurm starts them on their
own nodes), with the weight-transfer channel when the servers have one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gift_megatron.config import Config, ModelConfig
from gift_megatron.convert.hf_config import hf_config_from_model
from gift_megatron.convert.safetensors_io import HFWriter
from gift_megatron.launch import free_port
from gift_megatron.rollout.engine import Engine
from gift_megatron.rollout.tasks import TaskData, special_tokens


def write_model_config(folder: Path, model: ModelConfig, tokenizer) -> None:
    """config.json of the policy's architecture with the tokenizer's special ids, written atomically
    (servers may share the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps({**hf_config_from_model(model), **special_tokens(tokenizer)}))
    tmp.replace(folder / "config.json")


def write_hf_folder(hf_dir: Path, model: ModelConfig, weights, task: TaskData, *, with_weights: bool) -> list:
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
    write_model_config(hf_dir, model, task.tokenizer)
    task.tokenizer.save_pretrained(str(hf_dir))
    return meta


def start_engine(cfg: Config, hf_dir: Path, task: TaskData, run_dir: Path, meta: list) -> Engine:
    """rollout.engine=vllm: the in-process engine; vllm_server: servers started here or by URL."""
    if cfg.rollout.engine == "vllm":
        from gift_megatron.rollout.engine import LocalEngine

        return LocalEngine(hf_dir, cfg.rollout, seed=cfg.seed, max_model_len=cfg.model.max_position_embeddings,
                           stop_token_ids=[task.eos_id], dtype=cfg.model.params_dtype)
    return _server_pool(cfg, hf_dir, task, run_dir, meta)


def _server_pool(cfg: Config, hf_dir: Path, task: TaskData, run_dir: Path, meta: list) -> Engine:
    from gift_megatron.rollout.servers import ServerPool, VLLMServer, wait_all_ready
    from gift_megatron.rollout.weight_transfer import WeightTransfer, backend_for

    r, backend = cfg.rollout, backend_for(cfg.rollout.weight_sync, cfg.on_gpu)
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
