"""Config checks that run before any data or model is loaded.

Each check returns nothing or raises ``UserError`` naming the key. Add a check
next to the group it guards; ``validate`` runs all of them.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError

KNOWN_STAGES = ("pair", "reference", "train", "evaluate", "analyse")


def check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"config key(s) {', '.join(missing)} are required (value '???'); set them on the command line, e.g. {missing[0]}=...")


def check_stages(cfg: DictConfig) -> None:
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in KNOWN_STAGES]
    if unknown:
        raise UserError(f"stages: unknown stage(s) {unknown}; valid stages are {list(KNOWN_STAGES)}")


def select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def positive(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise UserError(f"{key}={value!r}: expected a number > 0")
    return check


def non_negative(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise UserError(f"{key}={value!r}: expected a number >= 0")
    return check


def fraction(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise UserError(f"{key}={value!r}: expected a number between 0 and 1")
    return check


CHECKS: list[Callable[[DictConfig], None]] = [
    check_missing,
    check_stages,
    fraction("data.max_bad_fraction"),
    fraction("pairing.test_fraction"),
]


def validate(cfg: DictConfig) -> None:
    for check in CHECKS:
        check(cfg)
