"""A multi-rank run's supervised warm-up, in a one-process world of its own (megatron/warmup.py):

    python -m gift_megatron.warmup_job RUN_DIR/config.yaml CACHE_PATH

The composition of the task (rollout side) and the warm-up (megatron side), which import neither each other.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gift_megatron.config import Config
from gift_megatron.megatron.parallel import init_distributed, init_model_parallel
from gift_megatron.megatron.warmup import SINGLE, train_warmup
from gift_megatron.rollout.tasks import build_task


def main(config_yaml: str, path: str) -> None:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_yaml)))
    assert isinstance(cfg, Config)
    init_distributed(SINGLE, cfg.on_gpu)
    init_model_parallel(SINGLE, cfg.seed, cfg.on_gpu)
    train_warmup(cfg, build_task(cfg.data, cfg.model.vocab_size, Path(cfg.run_dir)), Path(path))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main(*sys.argv[1:3])
