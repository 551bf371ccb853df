"""Config checks that catch, before the first stage computes, what would otherwise fail late.

Each used to surface only after earlier stages had run (a seed numpy refuses at training time, an
evaluation suite whose files the data never writes, found after training): ``pipeline.orchestration.validate`` runs
these with its own checks, each raising ``UserError`` with one line naming the key.
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError

SEED_LIMIT = 2**32  # numpy's and torch's seeds are unsigned 32-bit
SEED_KEYS = ("seed", "data.seed", "model.tiny.seed", "eval.fewshot_seed")
# Files of the pair artifact that only synthetic data writes (pipeline/stages/pair.py): the local suite's items.
SYNTHETIC_EVAL_FILES = ("eval_mc.jsonl", "eval_gen.jsonl")


def select(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seed_in_range(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (whole(value) and 0 <= value < SEED_LIMIT):
            raise UserError(f"{key}={value!r}: expected a whole number in [0, 2**32) (0 to {SEED_LIMIT - 1})")
    return check


def check_bucket_count(cfg: DictConfig) -> None:
    """Buckets exist to compare pairs across them: settings that give one bucket are refused."""
    edges, quantiles = select(cfg, "pairing.bucket_edges"), select(cfg, "pairing.quantiles")
    if edges is not None:
        if OmegaConf.is_list(edges) and len(edges) == 2:
            raise UserError(f"pairing.bucket_edges={list(edges)}: two edges make one bucket (the outer buckets are "
                            "open-ended); expected at least three strictly increasing numbers, e.g. [0.0,0.2,1.0]")
        return
    if select(cfg, "pairing.unit") is not None and quantiles is not None and not (whole(quantiles) and quantiles >= 2):
        raise UserError(f"pairing.quantiles={quantiles!r}: expected a whole number of equal-count buckets >= 2 "
                        "(1 makes a single bucket), e.g. pairing.quantiles=4")


def check_local_suite_files(cfg: DictConfig) -> None:
    """The local evaluation suite reads held-out items that only synthetic data writes; refused before training."""
    stages = list(select(cfg, "stages") or [])
    if "evaluate" not in stages or select(cfg, "eval.suite") != "local":
        return
    tasks = select(cfg, "eval.tasks") or {}
    source = select(cfg, "data.source")
    for name in tasks:
        wanted = select(cfg, f"eval.tasks.{name}.source")
        if source != "synthetic" or wanted not in SYNTHETIC_EVAL_FILES:
            raise UserError(f"eval.tasks.{name}.source={wanted}: the pair stage does not write this file for "
                            f"data.source={source} (only synthetic data writes {', '.join(SYNTHETIC_EVAL_FILES)}); "
                            "use eval=none (preference metrics only), eval=open_llm_v1 (hub tasks) or stages without evaluate")
    items, pool = select(cfg, "data.num_eval_items"), select(cfg, "eval.fewshot_pool")
    if whole(items) and whole(pool) and tasks and items <= pool:
        raise UserError(f"data.num_eval_items={items}: the local suite keeps the first eval.fewshot_pool={pool} items "
                        f"for shots and needs test items after them; expected more than {pool} (or eval=none)")


CHECKS: list[Callable[[DictConfig], None]] = [
    *(seed_in_range(key) for key in SEED_KEYS),
    check_bucket_count,
    check_local_suite_files,
]
