"""A Hydra launcher for several jobs at once on one multi-GPU machine, each on GPUs of its own (Hydra finds
launcher plugins only in the hydra_plugins namespace package, hence this folder).

submitit's local executor gives every job the same GPUs (``range(gpus_per_node)``: all jobs on GPU 0 with
one GPU each). This launcher runs the sweep's jobs through that executor, at most as many at once as the
visible GPUs allow, and gives each running job a disjoint slice (``cluster.gpu_slices``) as its CUDA_VISIBLE_DEVICES, set in the job's process before anything touches CUDA
(submitit's own ``visible_gpus`` cannot be reached through the AutoExecutor Hydra uses); a job that ends frees
its slice for the next one. Preset: ``hydra/launcher=submitit_local_gpu`` (conf/hydra/launcher/submitit_local_gpu.yaml).
"""

from __future__ import annotations

import copy
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

from pipeline.orchestration.cluster import gpu_slices, visible_devices
from pipeline.errors import UserError


class LocalGpuLauncher(LocalLauncher):
    job_gpus: list[str] | None = None  # set on the per-job copy; read in the job's process

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        if self.job_gpus is not None:  # before anything initialises CUDA in the job
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.job_gpus)
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            slices = gpu_slices(int(self.params.get("gpus_per_node") or 0), visible_devices())
        except UserError as error:  # before any job starts: one line, as the entry point prints user errors
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        free: queue.Queue[list[str]] = queue.Queue()
        for devices in slices:
            free.put(devices)

        def run_one(index: int) -> JobReturn:
            devices = free.get()  # blocks until a running job ends and hands its GPUs back
            try:
                launcher = copy.copy(self)  # the same job function and config, its own GPUs
                launcher.job_gpus = devices
                return LocalLauncher.launch(launcher, [job_overrides[index]], initial_job_idx + index)[0]
            finally:
                free.put(devices)

        with ThreadPoolExecutor(max_workers=len(slices)) as pool:
            return list(pool.map(run_one, range(len(job_overrides))))
