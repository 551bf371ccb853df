"""Chains the stages of one run through the artifact store.

Each stage module exposes ``run(cfg, upstream, root) -> Artifact``. A stage's
upstream artifacts are computed first (usually cache hits); optional upstreams
are used only when the user asked for that stage too (``evaluate`` scores the
trained model when ``train`` is among the stages, else the base model).
The run record ``run.json`` in the Hydra output directory lists every artifact
key the run used, so analysis can find them without W&B.

Under a distributed launch (``accelerate launch --multi_gpu``, torchrun) every process runs this;
only the main one prints, writes ``run.json`` and runs the non-collective stages. The others run
just the collective stages (pipeline/store/distributed.py: reference scoring, training and lm-eval, each
rank its share; their other upstream stages are cache hits or computed under the lock).
"""

from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from pipeline.store.artifacts import Artifact, forcing, verifying
from pipeline.errors import UserError
from pipeline.interrupts import Interrupted
from pipeline.orchestration.job_memory import release_job_memory
from pipeline.orchestration.validate import validate

STAGE_MODULES = {
    "model": "pipeline.stages.model",
    "pair": "pipeline.stages.pair",
    "reference": "pipeline.stages.reference",
    "train": "pipeline.stages.train",
    "evaluate": "pipeline.stages.evaluate",
    "analyse": "pipeline.stages.analyse",
}
REQUIRED_UPSTREAM = {
    "model": (),
    "pair": ("model",),
    "reference": ("model", "pair"),
    "train": ("model", "pair", "reference"),
    "evaluate": ("model", "pair", "reference"),
    "analyse": (),
}
OPTIONAL_UPSTREAM = {
    "evaluate": ("train",),
    "analyse": ("model", "pair", "reference", "train", "evaluate"),
}
RUN_RECORD = "run.json"
# Stages that every process of a distributed launch computes together; the rest run on the main one.
COLLECTIVE_STAGES = ("reference", "train", "evaluate")
# Where launchers put the global rank: torchrun / accelerate, then MPI flavours (as accelerate reads them).
RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


def is_main_process() -> bool:
    """False on every process but rank 0 of a distributed launch (read from the launcher's env: no process group yet)."""
    return next((int(os.environ[name]) for name in RANK_ENV if os.environ.get(name)), 0) == 0


# recompute=[evaluate] recomputes every artifact the evaluate stage builds, not only the last one.
STAGE_ARTIFACTS = {"evaluate": ("evaluate", "lm_eval", "eval_suite")}


def forced_artifacts(stages) -> list[str]:
    """The artifacts ``recompute=[...]`` recomputes: the named stages' (downstream ones keep their keys and
    are recomputed only if named too)."""
    return list(dict.fromkeys(name for stage in stages for name in STAGE_ARTIFACTS.get(stage, (stage,))))


def invocation(run_dir: Path) -> str:
    """The command a run belongs to: a multirun's folder (shared by its jobs), else the run's own folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return str(Path(to_absolute_path(str(HydraConfig.get().sweep.dir))))
    return str(Path(run_dir).resolve())


def artifacts_root(cfg: DictConfig) -> Path:
    return Path(to_absolute_path(str(cfg.artifacts_dir)))


class Run:
    """One pipeline run: computes stages on demand and records what it used."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.root = artifacts_root(cfg)
        self.run_dir = Path(run_dir)
        self.main = is_main_process()
        self.artifacts: dict[str, Artifact] = {}
        self.claimed = False
        self.forced = forced_artifacts(OmegaConf.select(cfg, "recompute", default=[]) or [])
        self.invocation = invocation(self.run_dir)
        self.verify = str(OmegaConf.select(cfg, "store_verify", default="small"))
        self.record: dict[str, Any] = {
            "sweep_name": cfg.sweep_name,
            "method": OmegaConf.select(cfg, "method.name"),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "status": "running",
            "forced": list(OmegaConf.select(cfg, "recompute", default=[]) or []),
            "artifacts": {},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # which GPUs this job was given
        }

    def upstream_names(self, stage: str) -> list[str]:
        requested = set(self.cfg.stages)
        optional = [name for name in OPTIONAL_UPSTREAM.get(stage, ()) if name in requested]
        return list(REQUIRED_UPSTREAM[stage]) + optional

    def get(self, stage: str) -> Artifact:
        if stage not in self.artifacts:
            upstream = {name: self.get(name) for name in self.upstream_names(stage)}
            module = importlib.import_module(STAGE_MODULES[stage])
            with forcing(self.forced, self.invocation), verifying(self.verify):
                artifact = module.run(self.cfg, upstream, self.root)
            self.artifacts[stage] = artifact
            status = "cached" if artifact.cached else "computed"
            if self.main:
                print(f"[{stage}] artifact {artifact.path} ({status})", flush=True)
            # relpath: the store and its run folders can move together (a store copied to another machine)
            self.record["artifacts"][stage] = {"key": artifact.key, "path": str(artifact.path),
                                               "relpath": os.path.relpath(artifact.path, self.run_dir),
                                               "cached": artifact.cached, "forced": stage in self.forced}
            self.save()
        return self.artifacts[stage]

    def save(self) -> None:
        if not self.main:  # one writer of run.json per run
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / RUN_RECORD
        if not self.claimed:  # a record this run did not write (a reused hydra.run.dir): keep it beside ours
            if path.exists():
                kept = path.with_name(f"run.{time.strftime('%Y%m%d-%H%M%S', time.gmtime(path.stat().st_mtime))}-{os.getpid()}.json")
                os.replace(path, kept)
                print(f"[run] {path} existed; kept as {kept.name}", flush=True)
            self.claimed = True
        temporary = path.with_name(f".{RUN_RECORD}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.record, indent=2, default=str))
        os.replace(temporary, path)  # a reader never sees half a record

    def execute(self) -> dict[str, Any]:
        # One process may run many jobs (a Hydra multirun): free what an earlier job left (a failed one's
        # too) before this one loads anything, and this job's models once it is done (orchestration/job_memory.py).
        release_job_memory()
        try:
            validate(self.cfg)  # before any data or model is loaded
            for stage in self.cfg.stages:
                if self.main or stage in COLLECTIVE_STAGES:
                    self.get(stage)
            self.record["status"] = "ok"
        except UserError as error:
            self.record.update(status="failed", error=str(error))
            raise
        except (Interrupted, KeyboardInterrupt) as error:  # SIGTERM/SIGINT: a rerun resumes (pipeline/interrupts.py)
            self.record.update(status="interrupted", error=f"{type(error).__name__}: {error}")
            raise
        except BaseException as error:
            self.record.update(status="failed", error=f"{type(error).__name__}: {error}",
                               traceback=traceback.format_exc())
            raise
        finally:
            self.record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.save()
            release_job_memory()
        return self.record
