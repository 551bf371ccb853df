"""Experiment tracking: the one place that talks to Weights & Biases.

Artifacts are the source of truth; W&B only mirrors them. ``start_run`` returns a
``Tracker``; with ``logger=none`` it is a true no-op (wandb is never imported and
nothing is written). W&B runs are offline unless ``logger.mode`` or
``$WANDB_MODE`` says otherwise, grouped by ``sweep_name``, typed by stage
(``job_type``), and carry method / beta / lambda_ / bucket / seed as flat config
fields so the UI can group by them. Each run is finished explicitly, because
under Hydra multirun several jobs share one process and would merge otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class Tracker:
    """No-op tracker (``logger=none``); the W&B tracker below has the same methods."""

    enabled = False

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_table(self, name: str, dataframe: Any) -> None:
        pass

    def log_image(self, name: str, path: str | Path) -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


class WandbTracker(Tracker):
    enabled = True

    def __init__(self, run: Any):
        import wandb

        self._wandb = wandb
        self.run = run
        self._finished = False

    @property
    def directory(self) -> Path:
        return Path(self.run.dir).parent  # .../wandb/<offline-run-...>/files -> the run folder

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.run.summary[name] = value

    def log_table(self, name: str, dataframe: Any) -> None:
        self.run.log({name: self._wandb.Table(dataframe=dataframe)})

    def log_image(self, name: str, path: str | Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()


def flat_run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config plus the fields the W&B UI groups by, flat at the top level."""
    full = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    flat = {
        "method": OmegaConf.select(cfg, "method.name"),
        "beta": OmegaConf.select(cfg, "method.beta"),
        "lambda_": OmegaConf.select(cfg, "method.lambda_"),
        "bucket": OmegaConf.select(cfg, "pairing.bucket_filter"),
        "seed": OmegaConf.select(cfg, "seed"),
        "model_name": OmegaConf.select(cfg, "model.name") or OmegaConf.select(cfg, "model.hub_id"),  # generic hub preset: its id
        "data_name": OmegaConf.select(cfg, "data.name"),
    }
    full.update(flat)
    return full


def run_name(cfg: DictConfig, stage: str) -> str:
    """``<stage>-<method>[-b<beta>][-l<lambda>][-<bucket>]-s<seed>``: the settings sweeps vary, readable in the UI."""
    parts = [stage, str(OmegaConf.select(cfg, "method.name"))]
    for prefix, key in (("b", "method.beta"), ("l", "method.lambda_"), ("", "pairing.bucket_filter")):
        value = OmegaConf.select(cfg, key)
        if value is not None:
            parts.append(f"{prefix}{value}")
    parts.append(f"s{OmegaConf.select(cfg, 'seed')}")
    return "-".join(parts)


def start_run(cfg: DictConfig, job_type: str, name: str | None = None, run_id: str | None = None) -> Tracker:
    """Open a tracker for one stage of one run (``job_type`` = the stage name).

    ``run_id`` (e.g. derived from the artifact key) makes W&B continue that run instead of opening a
    new one: a resumed training logs into the run it started.
    """
    logger = OmegaConf.select(cfg, "logger.name", default="none")
    if logger in (None, "none"):
        return Tracker()
    if logger != "wandb":
        from pipeline.errors import UserError

        raise UserError(f"logger.name={logger!r}: expected 'wandb' or 'none'")
    import wandb  # only here: logger=none must never import it

    mode = OmegaConf.select(cfg, "logger.mode") or os.environ.get("WANDB_MODE") or "offline"
    tags = list(OmegaConf.select(cfg, "logger.tags", default=[]) or [])
    run = wandb.init(
        project=OmegaConf.select(cfg, "logger.project", default="prefopt"),
        entity=OmegaConf.select(cfg, "logger.entity"),
        group=OmegaConf.select(cfg, "sweep_name"),
        job_type=job_type,
        name=name or run_name(cfg, job_type),
        id=run_id,
        resume="allow" if run_id else None,
        tags=tags,
        config=flat_run_config(cfg),
        mode=mode,
        dir=os.environ.get("WANDB_DIR"),
        reinit="create_new",  # multirun: never attach to a previous job's run
    )
    return WandbTracker(run)
