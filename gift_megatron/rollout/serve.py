"""One vLLM OpenAI server for a run, as Slurm starts them on rollout nodes:

    python -m gift_megatron.rollout.serve --host ADDR --port 8000 [--index I] -- HYDRA_OVERRIDES...

The settings come from the trainer's own Hydra config (the same overrides): model architecture,
dtype, rollout.* (TP, memory, weight_sync backend). Without `rollout.server_model_dir` the server
starts with dummy weights of the model's architecture (a config.json written from the model preset)
and the trainer syncs its weights in before the first generation, so no server reads a checkpoint
from disk. The job's secret comes from GIFT_SERVER_SECRET (the batch script makes one per job) and
reaches the server by environment only.
The process becomes the vLLM server (exec), so Slurm's signals reach it directly.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gift_megatron.config import Config
from gift_megatron.rollout.auth import secret_from_env


def architecture_folder(cfg: Config, folder: Path) -> Path:
    """config.json of the policy's architecture and the task tokenizer's special ids: what a server
    needs to start with dummy weights."""
    from gift_megatron.rollout.startup import write_model_config
    from gift_megatron.rollout.tasks import load_tokenizer

    write_model_config(folder, cfg.model, load_tokenizer(cfg.data, folder / "tokenizer"))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="address to bind (default rollout.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--index", type=int, default=0, help="this server's index (its seed offset)")
    parser.add_argument("overrides", nargs="*", help="the trainer's Hydra overrides")
    args = parser.parse_args(argv)
    secret = secret_from_env()  # before anything slow: a server without the job's secret never starts

    from hydra import compose, initialize_config_dir

    from gift_megatron.config import CONF_DIR, register_configs, to_config
    from gift_megatron.rollout.servers import server_command
    from gift_megatron.rollout.weight_transfer import backend_for

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_config(compose("config", overrides=args.overrides))
    r = cfg.rollout
    if r.server_model_dir:
        model_dir, load_format = r.server_model_dir, "auto"
    else:
        model_dir, load_format = architecture_folder(cfg, Path(cfg.run_dir) / "server_model"), "dummy"
    cmd, env = server_command(model_dir, args.host or r.host, args.port, r, seed=cfg.seed + args.index,
                              max_model_len=cfg.model.max_position_embeddings, secret=secret,
                              dtype=cfg.model.params_dtype,
                              transfer_backend=backend_for(r.weight_sync, cfg.on_gpu), load_format=load_format)
    print("gift serve:", " ".join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
