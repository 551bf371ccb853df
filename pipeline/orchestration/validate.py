"""Config checks that run before any data or model is loaded.

Each check returns nothing or raises ``UserError`` naming the key. Add a check
next to the group it guards; ``validate`` runs all of them.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import UserError

KNOWN_STAGES = ("model", "pair", "reference", "train", "evaluate", "analyse")


def check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"config key(s) {', '.join(missing)} are required (value '???'); set them on the command line, e.g. {missing[0]}=...")


def check_stages(cfg: DictConfig) -> None:
    for key in ("stages", "recompute"):
        value = select(cfg, key)
        if value is None:
            continue
        unknown = [s for s in list(value) if s not in KNOWN_STAGES]
        if unknown:
            raise UserError(f"{key}: unknown stage(s) {unknown}; valid stages are {list(KNOWN_STAGES)}")


def check_store_verify(cfg: DictConfig) -> None:
    from pipeline.store.artifacts import VERIFY_MODES
    value = select(cfg, "store_verify")
    if value is not None and value not in VERIFY_MODES:
        raise UserError(f"store_verify={value!r}: expected one of {', '.join(VERIFY_MODES)}")


def select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, string, inf or nan)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (is_number(value) and value > 0):
            raise UserError(f"{key}={value!r}: expected a finite number > 0")
    return check


def non_negative(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (is_number(value) and value >= 0):
            raise UserError(f"{key}={value!r}: expected a finite number >= 0")
    return check


def fraction(key: str) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (is_number(value) and 0 <= value <= 1):
            raise UserError(f"{key}={value!r}: expected a number between 0 and 1")
    return check


def integer(key: str, minimum: int) -> Callable[[DictConfig], None]:
    """A whole number >= ``minimum`` (null allowed: the key's comment says what null means)."""
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise UserError(f"{key}={value!r}: expected a whole number >= {minimum}")
    return check


# Names that become folder names (runs/<sweep_name>/...): one path component, no way out of runs/.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_path_names(cfg: DictConfig) -> None:
    name = select(cfg, "sweep_name")
    if name is not None and (not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name):
        raise UserError(f"sweep_name={name!r}: expected a plain folder name (letters, digits, '.', '_', '-'; "
                        "no '/', '..' or absolute path), e.g. sweep_name=my_sweep")


def check_artifacts_dir(cfg: DictConfig) -> None:
    """The store's folder must be creatable: no existing file on its path, and writable where it exists."""
    value = select(cfg, "artifacts_dir")
    if value is None:  # partial configs (tests of one group); the composed config always has it
        return
    path = os.path.abspath(os.path.expanduser(str(value)))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"artifacts_dir={value}: {existing} is a file; expected a folder (or a path that can be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"artifacts_dir={value}: {existing} is not writable")


def check_group_like_keys(cfg: DictConfig) -> None:
    """``+group/option=x`` naming a group conf/ does not have is added by Hydra as a plain key
    ``group/option``, silently: the run would go on with the default instead of the choice."""
    for key in cfg:
        if "/" in str(key):
            hint = (" (the method variants sweeps/variant/compare/ are read by named sweeps only: use sweep=<name>, "
                    "or for one run method=<name> method.beta=0.3)" if str(key).startswith("variant/") else "")
            raise UserError(f"+{key}={cfg[key]}: no config group '{key}' in conf/; expected an existing group "
                            f"(python -m pipeline --help lists them){hint}")


CHECKS: list[Callable[[DictConfig], None]] = [
    check_missing,
    check_group_like_keys,
    check_path_names,
    check_artifacts_dir,
    integer("seed", 0),
    check_stages,
    check_store_verify,
    fraction("data.max_bad_fraction"),
    fraction("pairing.test_fraction"),
]


def half_open_fraction(key: str) -> Callable[[DictConfig], None]:
    """Value in [0, 0.5): a label-flip rate (robust DPO divides by 1 - 2 epsilon)."""
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and not (is_number(value) and 0 <= value < 0.5):
            raise UserError(f"{key}={value!r}: expected a number in [0, 0.5)")
    return check


def one_of(key: str, choices: tuple[str, ...] | list[str]) -> Callable[[DictConfig], None]:
    def check(cfg: DictConfig) -> None:
        value = select(cfg, key)
        if value is not None and value not in choices:
            raise UserError(f"{key}={value!r}: expected one of {list(choices)}")
    return check


def check_method_loss(cfg: DictConfig) -> None:
    """method.loss must name a loss of pipeline.training.losses.LOSSES (imported lazily: it pulls in torch)."""
    name = select(cfg, "method.loss")
    if name is not None:
        from pipeline.training.losses import get_loss
        get_loss(str(name))


def check_method_flags(cfg: DictConfig) -> None:
    for key in ("needs_reference", "needs_vocab_term", "accepts_unpaired", "guards", "average_log_ratios"):
        value = select(cfg, f"method.{key}")
        if value is not None and not isinstance(value, bool):
            raise UserError(f"method.{key}={value!r}: expected true or false")


# Loss hyper-parameters (conf/method/*.yaml); each check is a no-op where the method has no such key.
CHECKS += [
    check_method_loss,
    check_method_flags,
    positive("method.beta"),
    non_negative("method.lambda_"),
    half_open_fraction("method.epsilon"),
    non_negative("method.gamma"),
    non_negative("method.lam"),
    non_negative("method.alpha"),
    one_of("method.normalisation", ("batch_min", "per_sequence", "none")),
    non_negative("method.desirable_weight"),
    non_negative("method.undesirable_weight"),
    one_of("method.reference_point", ("batch", "zero")),
]


def validate(cfg: DictConfig) -> None:
    for check in CHECKS:
        check(cfg)


# Training (conf/train/); appended after validate() on purpose: CHECKS is read when validate runs.
def check_train_choices(cfg: DictConfig) -> None:
    for key, choices in (("train.precision", ("fp32", "bf16", "auto")), ("train.schedule", ("linear", "cosine", "constant"))):
        value = select(cfg, key)
        if value is not None and value not in choices:
            raise UserError(f"{key}={value!r}: expected one of {list(choices)}")


def check_train_lengths(cfg: DictConfig) -> None:
    """The response needs room: max_length must exceed the prompt budget (and fit the tiny model)."""
    length, prompt = select(cfg, "train.max_length"), select(cfg, "train.max_prompt_length")
    if isinstance(length, int) and isinstance(prompt, int) and length <= prompt:
        raise UserError(f"train.max_length={length} must be longer than the prompt budget train.max_prompt_length={prompt} "
                        "(tokens left for the response); e.g. train.max_length={0}".format(2 * prompt))
    positions = select(cfg, "model.tiny.max_position_embeddings") if select(cfg, "model.source") == "tiny" else None
    if isinstance(length, int) and isinstance(positions, int) and length > positions:
        raise UserError(f"train.max_length={length} exceeds model.tiny.max_position_embeddings={positions}")


def check_train_adam(cfg: DictConfig) -> None:
    betas = select(cfg, "train.adam_betas")
    if betas is not None and not (len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise UserError(f"train.adam_betas={list(betas)!r}: expected two numbers in [0, 1), e.g. [0.9,0.999]")
    ratio = select(cfg, "train.warmup_ratio")
    if ratio is not None and not (is_number(ratio) and 0 <= ratio < 1):
        raise UserError(f"train.warmup_ratio={ratio!r}: expected a number in [0, 1)")


def check_train_flags(cfg: DictConfig) -> None:
    for key in ("train.disable_dropout", "train.drop_one_side"):
        value = select(cfg, key)
        if value is not None and not isinstance(value, bool):
            raise UserError(f"{key}={value!r}: expected true or false")


CHECKS += [
    positive("train.lr"),
    integer("train.max_steps", 1),  # null means "use train.epochs"
    positive("train.epochs"),
    integer("train.batch_size", 1),
    integer("train.grad_accumulation", 1),
    integer("train.max_length", 1),
    integer("train.max_prompt_length", 1),
    positive("train.max_grad_norm"),  # null disables clipping
    positive("train.adam_eps"),
    integer("train.probe_every", 1),
    non_negative("train.weight_decay"),
    integer("train.probe_pairs", 0),
    integer("train.checkpoint_every", 0),  # 0 = no checkpoints
    check_train_choices,
    check_train_lengths,
    check_train_adam,
    check_train_flags,
]


# Evaluation (conf/eval/): value checks, and offline hub presets whose datasets are not cached.
from pipeline.evaluation.eval_suite import check_eval_config, check_eval_hub_datasets  # noqa: E402

CHECKS += [check_eval_config, check_eval_hub_datasets]


# Model (conf/model/): source, dtype, LoRA values; offline hub models must already be cached.
def check_model(cfg: DictConfig) -> None:
    from pipeline.stages.model import check_model_config  # lazy: pulls in torch
    check_model_config(cfg)


def check_forward_layout(cfg: DictConfig) -> None:
    """train.prefix_sharing / logprob_chunk / pack_tokens, and a tree layout only with an attention that takes its mask."""
    if select(cfg, "train") is None:
        return
    from pipeline.modeling.scoring import MASKABLE, ForwardSettings  # lazy: pulls in torch
    settings = ForwardSettings.from_config(cfg.train, "fp32")
    attention = select(cfg, "model.attn_implementation")
    if attention is not None and attention not in MASKABLE:
        if settings.sharing != "none":
            raise UserError(f"model.attn_implementation={attention}: cannot take the custom attention mask of "
                            f"train.prefix_sharing={settings.sharing} (needs one of {', '.join(MASKABLE)}); set "
                            f"train.prefix_sharing=none")
        if settings.pack_tokens is not None:
            raise UserError(f"model.attn_implementation={attention}: cannot take the custom attention mask of "
                            f"train.pack_tokens={settings.pack_tokens} (needs one of {', '.join(MASKABLE)}); set "
                            f"train.pack_tokens=null")


def check_distributed(cfg: DictConfig) -> None:
    from pipeline.training.sharding import check_config  # lazy: pulls in torch
    check_config(cfg)


CHECKS += [check_model, check_forward_layout, check_distributed]


# Data and pairing (conf/data/, conf/pairing/): choices and shapes, before any file is read.
def check_data_and_pairing(cfg: DictConfig) -> None:
    from pipeline.data.adapters import SCHEMAS, STRATEGIES  # lazy: keeps `validate` import light
    from pipeline.data.distance import UNITS
    source = select(cfg, "data.source")
    if source is not None and source not in ("synthetic", "local", "hub"):
        raise UserError(f"data.source={source!r}: expected synthetic, local or hub")
    if source == "hub" and not select(cfg, "data.hub_id"):
        raise UserError("data.hub_id: required for data.source=hub (e.g. data.hub_id=Anthropic/hh-rlhf)")
    path = select(cfg, "data.path")
    if source == "local" and path not in (None, "???"):
        if os.path.isdir(os.path.expanduser(str(path))):
            raise UserError(f"data.path={path}: is a directory; expected a JSONL, JSON, Parquet or CSV file")
        if not os.path.isfile(os.path.expanduser(str(path))):
            raise UserError(f"data.path={path}: file not found (expected a JSONL, JSON, Parquet or CSV file)")
    one_of("data.schema", ("auto", *SCHEMAS))(cfg)
    one_of("data.multi_completion_strategy", STRATEGIES)(cfg)
    mix = select(cfg, "data.kind_mix")
    if mix is not None:
        from pipeline.data.synthetic_words import KINDS as WORD_KINDS
        kinds = ("corrupt_step", "wrong_solution", "mc_distractor", *WORD_KINDS)
        unknown = sorted(set(mix) - set(kinds))
        weights = [mix[k] for k in mix]
        if unknown or not all(is_number(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"data.kind_mix={dict(mix)}: expected weights >= 0 (sum > 0) for {', '.join(kinds)}")
    counts = [select(cfg, f"data.{k}") for k in ("num_eval_items", "eval_choices", "eval_max_operand")]
    if source == "synthetic" and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        from pipeline.data.synthetic import check_settings
        check_settings(*counts)
    one_of("pairing.unit", UNITS)(cfg)
    edges = select(cfg, "pairing.bucket_edges")
    if edges is not None:
        edges = list(edges)
        if len(edges) < 2 or not all(is_number(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise UserError(f"pairing.bucket_edges={edges}: expected at least two strictly increasing numbers")
        labels = select(cfg, "pairing.bucket_labels")
        names = list(labels) if labels is not None else (["low", "high"] if len(edges) == 3 else [f"b{i}" for i in range(len(edges) - 1)])
        if len(names) != len(edges) - 1:
            raise UserError(f"pairing.bucket_labels={names}: expected {len(edges) - 1} names for {len(edges)} edges")
        bucket_filter = select(cfg, "pairing.bucket_filter")
        if bucket_filter is not None and str(bucket_filter) not in names:
            raise UserError(f"pairing.bucket_filter={bucket_filter!r}: expected null or one of {names}")
    elif select(cfg, "pairing.unit") is not None and not (isinstance(select(cfg, "pairing.quantiles"), int) and select(cfg, "pairing.quantiles") >= 1):
        raise UserError("pairing.quantiles: expected an integer >= 1 when pairing.bucket_edges is null (e.g. pairing.quantiles=4)")


CHECKS += [
    check_data_and_pairing,
    integer("data.num_problems", 1),
    integer("data.num_eval_items", 0),
    integer("data.eval_choices", 2),
    integer("data.eval_max_operand", 2),
    integer("data.seed", 0),
    non_negative("data.min_score_gap"),
    integer("data.limit", 1),  # null = all rows
]


def check_unpaired_training(cfg: DictConfig) -> None:
    """One-sided rows (``data.schema=unpaired``, or ``train.drop_one_side=true``) train only a loss whose
    method file sets ``accepts_unpaired: true`` (BNF): one line naming the method and the flag, before any
    model loads. (A file that ``data.schema=auto`` finds unpaired is refused by the train stage.)"""
    if "train" not in list(cfg.stages):
        return
    causes = [(why, instead) for why, instead, on in (
        ("data.schema=unpaired", "paired data", select(cfg, "data.schema") == "unpaired"),
        ("train.drop_one_side=true", "train.drop_one_side=false", select(cfg, "train.drop_one_side") is True)) if on]
    if causes and select(cfg, "method.accepts_unpaired") is not True:
        from pipeline.data.unpaired import refusal  # lazy: pandas
        method = OmegaConf.to_container(cfg.method, resolve=True) if select(cfg, "method") is not None else {}
        raise refusal(method, " and ".join(c[0] for c in causes), " and ".join(c[1] for c in causes))


def check_held_out_pairs(cfg: DictConfig) -> None:
    """Evaluation scores held-out pairs: refuse an empty test split before hours of training."""
    if "evaluate" in list(cfg.stages) and select(cfg, "pairing.test_fraction") == 0:
        raise UserError("pairing.test_fraction=0: the evaluate stage needs held-out pairs; expected a value > 0 "
                        "(e.g. pairing.test_fraction=0.1) or stages without evaluate")


CHECKS += [check_unpaired_training, check_held_out_pairs]


# Checks of what would otherwise fail late: seed ranges, single-bucket settings, evaluation files the data lacks.
from pipeline.orchestration.preflight import CHECKS as PREFLIGHT_CHECKS  # noqa: E402

CHECKS += PREFLIGHT_CHECKS
