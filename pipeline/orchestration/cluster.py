"""Inside a submitit job (SLURM or submitit's local executor): the job's tasks become one distributed launch.

With ``hydra.launcher.tasks_per_node=N`` every task of the job runs the whole Hydra job. ``join_job_tasks``
turns submitit's view of the job (SLURM's variables, or the local executor's) into torch.distributed's
``env://`` variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) with submitit's own helper, before
anything reads the rank: the run then behaves exactly as under ``accelerate launch`` (pipeline/store/distributed.py,
pipeline/orchestration/orchestrate.py: rank 0 alone prints and writes, every rank trains).

``gpu_slices`` shares the GPUs of one machine out to jobs that run at the same time (for a local GPU
launcher: hydra_plugins/prefopt_local_gpu_launcher.py, preset hydra/launcher=submitit_local_gpu).
"""

from __future__ import annotations

import os
from typing import Sequence

from pipeline.errors import UserError

SUBMITIT_EXECUTOR_ENV = "SUBMITIT_EXECUTOR"  # set by submitit in every job it starts ("slurm", "local")


def join_job_tasks() -> int:
    """Export the job's task layout for torch.distributed; returns the number of tasks (1: nothing to do).

    CUDA_VISIBLE_DEVICES is left as the job has it: accelerate puts rank r on visible device
    ``LOCAL_RANK % device_count``, right both when every task sees all the job's GPUs and when SLURM binds
    one GPU to each task (submitit's own export would instead pin the physical index ``LOCAL_RANK``).
    """
    if not os.environ.get(SUBMITIT_EXECUTOR_ENV):
        return 1
    import submitit

    tasks = submitit.JobEnvironment().num_tasks
    if tasks > 1:
        # overwrite: variables inherited from the submitting shell (SLURM forwards its environment) are not this job's
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return tasks


def visible_devices(environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES when set, else every GPU torch counts."""
    environ = os.environ if environ is None else environ
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch
    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_slices(gpus_per_job: int, devices: Sequence[str]) -> list[list[str]]:
    """The disjoint slices of ``devices``, ``gpus_per_job`` GPUs each, in order: one per job that can run at
    the same time as the others (leftover GPUs stay unused); a one-line error when not even one job fits."""
    if gpus_per_job < 1:
        raise UserError(f"hydra.launcher.gpus_per_node={gpus_per_job}: expected at least 1 GPU per job "
                        "(use hydra/launcher=submitit_local_cpu for CPU jobs)")
    if gpus_per_job > len(devices):
        raise UserError(f"hydra.launcher.gpus_per_node={gpus_per_job}: only {len(devices)} GPU(s) visible "
                        f"({','.join(devices) or 'none'}); expected at most {len(devices)} (the GPUs CUDA_VISIBLE_DEVICES lists, or all)")
    slots = len(devices) // gpus_per_job
    return [list(devices[slot * gpus_per_job:(slot + 1) * gpus_per_job]) for slot in range(slots)]
