"""Every option of every config group and every sweep composes; every key is commented;
sweeps only choose options and override keys, never add them."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, REPO_ROOT, compose_config

SWEEPS_DIR = REPO_ROOT / "sweeps"
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra")
GROUP_OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
SWEEPS = sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml"))
ALL_YAML = sorted(CONF_DIR.rglob("*.yaml")) + sorted(SWEEPS_DIR.rglob("*.yaml"))
KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w.]*\s*:")


def flat_keys(cfg) -> set[str]:
    container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    keys: set[str] = set()

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            keys.add(prefix.rstrip("."))
    walk(container, "")
    return keys


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg[group] is not None


@pytest.mark.parametrize("path", ALL_YAML, ids=[str(p.relative_to(REPO_ROOT)) for p in ALL_YAML])
def test_every_key_is_commented(path: Path):
    lines = path.read_text().splitlines()
    uncommented = []
    previous = ""
    for number, line in enumerate(lines, 1):
        if KEY_LINE.match(line) and not line.lstrip().startswith(("defaults", "#", "-")):
            # a key is documented by a trailing comment, or by a comment line right above it,
            # or it is a mapping header whose children are documented
            is_header = line.rstrip().endswith(":")
            if "#" not in line and not previous.lstrip().startswith("#") and not is_header:
                uncommented.append(f"{path.name}:{number}: {line.strip()}")
        if line.strip():
            previous = line
    assert not uncommented, "uncommented keys:\n" + "\n".join(uncommented)


def sweep_jobs(sweep: str) -> list[list[str]]:
    """The override list of every job the sweep's basic-sweeper grid expands to."""
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        cfg = compose(config_name=sweep, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) or {}
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_overrides([f"{key}={value}"])[0]
        axes.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
    return [list(combo) for combo in itertools.product(*axes)]


def compose_sweep_job(sweep: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        return compose(config_name=sweep, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_job_composes_without_new_keys(sweep):
    jobs = sweep_jobs(sweep)
    assert jobs, f"sweep {sweep} has no grid"
    for overrides in jobs:
        job = compose_sweep_job(sweep, overrides)
        choices = {k: v for k, v in job.hydra.runtime.choices.items() if not k.startswith("hydra") and v is not None
                   and not k.startswith("variant")}
        base = compose_config(*[f"{group}={choice}" for group, choice in choices.items()])
        job_keys = flat_keys(OmegaConf.masked_copy(job, [k for k in job if k != "hydra"]))
        added = job_keys - flat_keys(base)
        assert not added, f"sweep {sweep} {overrides} adds keys {sorted(added)}"
        assert job.sweep_name == sweep


def test_default_sweep_compares_dpo_dpop_bnf():
    methods = sorted(compose_sweep_job("default", job).method.name for job in sweep_jobs("default"))
    assert methods == ["bnf", "dpo", "dpop"]


COMPARISON_SWEEPS = ("default", "smaug_edit_distance", "seeds", "bnf_baselines")


@pytest.mark.parametrize("sweep", COMPARISON_SWEEPS)
def test_method_comparisons_change_one_thing(sweep):
    """DPO and DPOP jobs of a comparison differ only in the penalty: same beta, and every other key equal."""
    jobs = [compose_sweep_job(sweep, overrides) for overrides in sweep_jobs(sweep)]
    by_method: dict[str, list] = {}
    for job in jobs:
        by_method.setdefault(job.method.loss, []).append(job)
    assert {"dpo", "dpop"} <= set(by_method)
    for dpo, dpop in zip(by_method["dpo"], by_method["dpop"]):
        assert float(dpo.method.beta) == float(dpop.method.beta) == 0.3
        strip = lambda job: {k: v for k, v in OmegaConf.to_container(job, resolve=False).items()  # noqa: E731
                             if k not in ("hydra", "method")}
        assert strip(dpo) == strip(dpop)


def test_beta_lambda_sweep_matches_smaug_figure_3():
    points = []
    for overrides in sweep_jobs("smaug_beta_lambda"):
        job = compose_sweep_job("smaug_beta_lambda", overrides)
        points.append((job.method.loss, float(job.method.beta), float(job.method.get("lambda_", 0.0))))
    assert sorted(points) == sorted([("dpo", 0.1, 0.0), ("dpo", 0.3, 0.0), ("dpo", 1.0, 0.0),
                                     ("dpop", 0.3, 5.0), ("dpop", 0.3, 50.0), ("dpop", 0.3, 500.0)])


def test_a_group_choice_conf_does_not_have_is_refused_not_silently_added():
    """`+variant/compare=dpo` outside a named sweep: Hydra adds a plain key and the run would train DPOP."""
    from pipeline.errors import UserError
    from pipeline.orchestration.validate import check_group_like_keys
    cfg = compose_config("+variant/compare=dpo")
    assert cfg.method.name == "dpop"  # what Hydra does on its own: the choice is lost
    with pytest.raises(UserError, match=r"^\+variant/compare=dpo: no config group 'variant/compare' in conf/.*sweep=<name>") as error:
        check_group_like_keys(cfg)
    assert "\n" not in str(error.value)
    for overrides in sweep_jobs("default"):  # inside a named sweep the same override is a real group choice
        job = compose_sweep_job("default", overrides)
        check_group_like_keys(OmegaConf.masked_copy(job, [k for k in job if k != "hydra"]))


# The claims' sweeps: at the study's settings where they say so, each with seeds.
STUDY_KEYS = ("data.num_problems", "data.seed", "data.num_eval_items", "train.max_steps", "train.lr",
              "train.batch_size", "train.probe_every", "train.probe_pairs", "train.precision")
AT_STUDY_SETTINGS = {"smaug_fig3": (), "bnf_lr_grid": ("train.lr",), "kto_vs_bnf_unpaired": (), "bnf_normaliser": (),
                     "reproduce_smaug_fp32": ("train.precision",)}


@pytest.mark.parametrize("sweep", sorted(AT_STUDY_SETTINGS))
def test_claim_sweeps_keep_the_study_settings_they_do_not_vary(sweep):
    study = compose_sweep_job("reproduce_smaug", sweep_jobs("reproduce_smaug")[0])
    jobs = [compose_sweep_job(sweep, overrides) for overrides in sweep_jobs(sweep)]
    for key in STUDY_KEYS:
        if key not in AT_STUDY_SETTINGS[sweep]:
            assert {str(OmegaConf.select(job, key)) for job in jobs} == {str(OmegaConf.select(study, key))}, key
    assert len({int(job.seed) for job in jobs}) >= 3
    if sweep != "reproduce_smaug_fp32":
        assert {job.pairing.bucket_filter for job in jobs} == {"low"}
    else:
        assert {job.train.precision for job in jobs} == {"fp32"} and len(jobs) == len(sweep_jobs("reproduce_smaug"))


def test_claim_sweeps_vary_what_they_name():
    fig3 = {(job.method.loss, float(job.method.beta), float(job.method.get("lambda_", 0)))
            for job in (compose_sweep_job("smaug_fig3", o) for o in sweep_jobs("smaug_fig3"))}
    assert fig3 == {("dpo", 0.1, 0), ("dpo", 0.3, 0), ("dpo", 1.0, 0), ("dpop", 0.3, 5), ("dpop", 0.3, 50), ("dpop", 0.3, 500)}
    grid = [compose_sweep_job("bnf_lr_grid", o) for o in sweep_jobs("bnf_lr_grid")]
    assert {(job.method.name, float(job.train.lr)) for job in grid} == {
        (m, lr) for m in ("dpo_beta0.1", "dpo", "bnf") for lr in (5e-6, 1e-5, 2e-5, 5e-5)}
    normaliser = [compose_sweep_job("bnf_normaliser", o) for o in sweep_jobs("bnf_normaliser")]
    assert {(job.method.loss, job.method.normalisation) for job in normaliser} == {("bnf", "batch_min"), ("bnf", "per_sequence")}
    unpaired = [compose_sweep_job("kto_vs_bnf_unpaired", o) for o in sweep_jobs("kto_vs_bnf_unpaired")]
    assert {job.method.loss for job in unpaired} == {"kto", "bnf"} and all(job.train.drop_one_side for job in unpaired)
    assert all(job.method.accepts_unpaired for job in unpaired)
    transfer = [compose_sweep_job("bnf_reasoning_transfer", o) for o in sweep_jobs("bnf_reasoning_transfer")]
    assert {job.method.loss for job in transfer} == {"dpo", "dpop", "bnf", "ipo", "simpo"}
    for job in transfer:  # word pairs only; >= 1,000 held-out reasoning items per task
        assert {k for k, v in job.data.kind_mix.items() if v > 0} == {"reverse_word", "sort_words", "antonym"}
        assert job.data.num_eval_items - job.eval.fewshot_pool >= 1000 and job.eval.limit is None
        assert "evaluate" in job.stages
