"""The command line around the Hydra app: ``--help`` built from the config files, and ``sweep=<name>``.

``python -m pipeline --help`` lists the stages, every config group with its options and each option's
first comment line, the named sweeps, the launchers and example commands; it is generated from
``conf/`` and ``sweeps/`` at call time, so it cannot drift from them. (Hydra's own help stays
available as ``--hydra-help``.)

``python -m pipeline sweep=<name> [overrides]`` runs the named sweep ``sweeps/<name>.yaml`` as a
multirun: it stands for ``--multirun --config-dir sweeps --config-name <name>``.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
SWEEPS_DIR = REPO_ROOT / "sweeps"
STAGES = (
    ("model", "the policy/reference model as a plain HF directory (tiny built, SmolLM2 converted once)"),
    ("pair", "load data, adapt its schema, edit distances, buckets, a prompt-disjoint train/test split"),
    ("reference", "per-token log-probs of the reference model on every pair, computed once"),
    ("train", "one method (DPO, DPOP, BNF, ...) from the reference; metrics, trajectories, model"),
    ("evaluate", "lm-eval on a task suite plus preference metrics on the held-out pairs, per bucket"),
    ("analyse", "tables, figures and a report from the artifacts"),
)
EXAMPLES = (
    ("a single run of three stages on the tiny model",
     "python -m pipeline stages=[pair,reference,train] model=tiny method=dpop train.max_steps=4"),
    ("a named sweep (sweeps/<name>.yaml), with an override", "python -m pipeline sweep=smaug_edit_distance train.max_steps=32"),
    ("your own data, BNF, without lm-eval", "python -m pipeline data=local data.path=/abs/prefs.jsonl method=bnf eval=none"),
)


def first_comment(path: Path) -> str:
    """The first comment line of a YAML file (its one-line description), without the '#'."""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("# @package"):
            return stripped.lstrip("#").strip()
        if stripped and not stripped.startswith("#"):
            break
    return ""


def defaults_of(config: Path) -> dict[str, str]:
    """group -> default option, read from conf/config.yaml's defaults list."""
    import yaml
    chosen = {}
    for entry in yaml.safe_load(config.read_text()).get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                if not str(group).startswith("override"):
                    chosen[str(group)] = str(option)
    return chosen


def help_text() -> str:
    defaults = defaults_of(CONF_DIR / "config.yaml")
    lines = ["prefopt: a reproducible pipeline for preference-optimisation losses (DPO, DPOP, BNF and baselines).", "",
             "Usage: python -m pipeline [group=option ...] [key=value ...]",
             "       python -m pipeline sweep=<name> [overrides]     (a named sweep, run as a multirun)",
             "       python -m pipeline -m key=a,b [overrides]       (your own multirun grid)", "",
             "Stages (stages=[...]; upstream stages run first, usually as cache hits):"]
    lines += [f"  {name:<10} {text}" for name, text in STAGES]
    lines += ["", "Config groups (group=option; * = default):"]
    for group in sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra"):
        lines.append(f"  {group.name}:")
        for option in sorted(group.glob("*.yaml")):
            mark = "*" if defaults.get(group.name) == option.stem else " "
            lines.append(f"    {mark}{option.stem:<18} {first_comment(option)}")
    lines += ["", "Named sweeps (python -m pipeline sweep=<name>, or make sweep SWEEP=<name>):"]
    lines += [f"    {path.stem:<19} {first_comment(path)}" for path in sorted(SWEEPS_DIR.glob("*.yaml"))]
    lines += ["", "Launchers (hydra/launcher=<name>; default: basic, one job after another in this process):"]
    lines += [f"    {path.stem:<19} {first_comment(path)}" for path in sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml"))]
    lines += ["", "Run-level keys: stages, seed, artifacts_dir, sweep_name (comments in conf/config.yaml).",
              "Every key of every group is commented in its file under conf/; print the composed config with --cfg job.",
              "", "Examples:"]
    for text, command in EXAMPLES:
        lines += [f"  # {text}", f"  {command}"]
    lines += ["", "Hydra's own options: --hydra-help."]
    return "\n".join(lines)


def rewrite_argv(argv: list[str]) -> list[str]:
    """``sweep=<name>`` -> ``--multirun --config-dir sweeps --config-name <name>``; other arguments untouched."""
    names = [arg for arg in argv[1:] if arg.startswith("sweep=")]
    if not names:
        return argv
    if len(names) > 1:
        raise UserError(f"{' '.join(names)}: name one sweep")
    name = names[0].split("=", 1)[1]
    available = sorted(path.stem for path in SWEEPS_DIR.glob("*.yaml"))
    if name not in available:
        raise UserError(f"sweep={name!r}: expected one of {available} (files in {SWEEPS_DIR})")
    rest = [arg for arg in argv[1:] if arg != names[0] and arg not in ("-m", "--multirun")]
    return [argv[0], "--multirun", "--config-dir", str(SWEEPS_DIR), "--config-name", name, *rest]
