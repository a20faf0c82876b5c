"""gift-train: Hydra entry point. Config -> components -> loop; no math here.

    gift-train                          # the embedded default: tiny model, 2-digit addition, GIFT, CPU
    gift-train algo=grpo num_steps=50   # any field or group from conf/
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gift_megatron.config import register_configs, to_config

log = logging.getLogger(__name__)
register_configs()
CONF = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: works for the console script too


@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def main(dict_cfg: DictConfig) -> dict:
    from gift_megatron.build import build
    from gift_megatron.trainer import StopFlag, close, maybe_resume, run

    for sig in (signal.SIGTERM, signal.SIGUSR1):  # Slurm's warning before the time limit
        signal.signal(sig, StopFlag.request)
    cfg = to_config(dict_cfg)
    for noisy in ("megatron", "vllm"):  # their INFO lines (parameter lists, kernel notes) drown the progress bar
        logging.getLogger(noisy).setLevel(logging.WARNING)
    components = build(cfg)
    try:
        maybe_resume(components)
        summary = run(components)
    finally:
        close(components)
    log.info("done: %s", summary)
    return summary


if __name__ == "__main__":
    main()
