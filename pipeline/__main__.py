"""Entry point: ``python -m pipeline [overrides]`` (a Hydra app; ``-m`` for multirun).

``--help`` and ``sweep=<name>`` are handled first by pipeline/orchestration/cli.py."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.environment import apply_run_defaults

apply_run_defaults(Path.cwd() / ".cache")

import hydra  # noqa: E402  (the environment must be set before HF/W&B imports)
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline.orchestration.cluster import join_job_tasks  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline import interrupts  # noqa: E402
from pipeline.orchestration.orchestrate import Run  # noqa: E402

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    join_job_tasks()  # a submitit job of several tasks: one distributed launch (before anything reads the rank)
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    run = Run(cfg, Path(hydra_cfg.runtime.output_dir))
    try:
        with interrupts.handled():
            run.execute()
    except interrupts.Interrupted as stop:  # the record says interrupted; the sweep stops too
        print(f"interrupted: {stop}; run record {run.run_dir / 'run.json'}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except UserError as error:
        # One line for the user; under multirun the other jobs go on and the sweep summary reports it.
        print(f"error: {error}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2)
    except Exception:
        if not multirun:
            raise
        import traceback
        traceback.print_exc()
    if not multirun and run.record["status"] == "failed":
        sys.exit(1)
    leave_process_group()


def leave_process_group() -> None:
    """Under a distributed launch, meet the other ranks and close the group before exiting: a rank that
    exits while gloo still holds connections to the others can abort ("terminate called ...")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def entry() -> None:
    from pipeline.orchestration import cli
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(cli.help_text())
        return
    try:
        sys.argv = cli.rewrite_argv(sys.argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    entry()
