"""gift-train: Hydra entry point. Config -> trainer (gift_megatron.build) -> loop; no math here.

    gift-train                          # the embedded default: tiny model, 2-digit addition, GIFT, CPU
    gift-train algo=grpo num_steps=50   # any field or group from conf/
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gift_megatron.config import CONF_DIR, apply_model_preset, register_configs, to_config
from gift_megatron.guard import protect
from gift_megatron.run_dir import claim_run_dir
from gift_megatron.stop import Preempted, StopFlag

log = logging.getLogger(__name__)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C after checkpointing; rerun to resume
register_configs()


def quiet_third_party(level: str) -> None:
    """Below `level` (log_level), only our own records reach Hydra's handlers: megatron, vLLM and
    transformers INFO lines (parameter lists, kernel notes, some set on loggers with their own level)
    drown the progress bar. Python warnings go through logging too, so they print above the bar."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)  # vLLM's own handler: it reads this at import
    threshold = logging.getLevelName(level)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= threshold or record.name.startswith(("gift_megatron", "__main__"))

    for handler in logging.getLogger().handlers:
        handler.addFilter(keep)
    logging.captureWarnings(True)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it (torchrun, Slurm, MPI); 0 when alone."""
    for var in ("RANK", "SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def log_from_rank0(rank: int, all_ranks: bool) -> None:
    """Other ranks log errors only (their INFO/WARNING lines repeat rank 0's), or, with `all_ranks`,
    everything with a rank prefix."""
    if rank == 0:
        return
    if all_ranks:
        make = logging.getLogRecordFactory()

        def prefixed(*args, **kwargs) -> logging.LogRecord:
            record = make(*args, **kwargs)
            record.msg = f"[rank {rank}] {record.msg}"
            return record

        logging.setLogRecordFactory(prefixed)
        return
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.ERROR)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dict_cfg: DictConfig) -> dict:
    log_from_rank0(launcher_rank(), dict_cfg.log_all_ranks)
    quiet_third_party(dict_cfg.log_level)  # before megatron's import: it logs INFO lines as it loads
    # Slurm's warning before the time limit, and Ctrl-C: finish the step, save, leave (a second Ctrl-C aborts)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, StopFlag.request)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and not any(o.startswith("run_dir=") for o in hc.overrides.task):
        dict_cfg.run_dir = hc.runtime.output_dir  # each sweep job its own run folder
    cfg = to_config(apply_model_preset(dict_cfg, list(hc.overrides.task)))
    # rank 0 owns run_dir from here on; claimed before the heavy imports, so a second launch is refused in seconds
    lock = claim_run_dir(Path(cfg.run_dir), cfg.resume, cfg.move_old_run) if launcher_rank() == 0 else None
    try:
        from gift_megatron.build import build

        trainer = build(cfg, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        trainer.resume()
        summary = trainer.run()
    except Preempted as stop:
        if stop.signum == signal.SIGINT:  # the user stopped it: not a job to requeue
            log.warning("%s: checkpoint saved; run the same command again to resume", stop)
            sys.exit(EXIT_INTERRUPTED)
        log.warning("%s: checkpoint saved; exiting with %d so the job can be requeued", stop, EXIT_PREEMPTED)
        sys.exit(EXIT_PREEMPTED)
    finally:
        trainer.close()
    log.info("done: %s", summary)
    return summary


def cli() -> None:
    """`gift-train` and `python -m gift_megatron.train`. First the guard (it re-executes this process
    once): every process the run starts ends with it, even after a SIGKILL. Jobs that Hydra's Slurm
    launcher runs call `main` directly: there Slurm's cgroup ends a job's processes."""
    protect()
    main()


if __name__ == "__main__":
    cli()
