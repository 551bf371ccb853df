"""conf/hydra/launcher/slurm.yaml composes with and without the gitignored site file, and what it composes
reaches submitit's sbatch script (rendered here without a cluster)."""

from __future__ import annotations

import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR

SITE = CONF_DIR / "hydra" / "launcher" / "site" / "slurm.yaml.example"


def launcher_config(conf_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def conf_copy(tmp_path: Path, site: bool) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "hydra" / "launcher" / "site" / "slurm.yaml").unlink(missing_ok=True)  # a developer's own, if any
    if site:
        shutil.copy(SITE, conf / "hydra" / "launcher" / "site" / "slurm.yaml")
    return conf


def test_preset_without_site_file_requeues_and_has_no_partition(tmp_path):
    launcher = launcher_config(conf_copy(tmp_path, site=False))
    assert launcher.partition is None and launcher.account is None and launcher.setup is None
    assert launcher.max_num_timeout == 3 and launcher.tasks_per_node == 1


def test_site_file_is_merged_and_the_command_line_wins(tmp_path):
    conf = conf_copy(tmp_path, site=True)
    launcher = launcher_config(conf)
    assert (launcher.partition, launcher.account) == ("gpu", "myproj")
    assert list(launcher.setup) == ["module load cuda/12.4", "source .venv/bin/activate"]
    assert launcher_config(conf, "hydra.launcher.partition=debug").partition == "debug"


def test_composed_preset_reaches_the_sbatch_script(tmp_path):
    """The composed values rendered by submitit's own sbatch writer (the executor itself needs `srun`)."""
    from submitit.slurm.slurm import _make_sbatch_string
    launcher = launcher_config(conf_copy(tmp_path, site=True), "hydra.launcher.tasks_per_node=4",
                               "hydra.launcher.gpus_per_node=4")
    script = _make_sbatch_string(
        "python -m pipeline", tmp_path / "jobs", partition=launcher.partition, account=launcher.account,
        time=launcher.timeout_min, ntasks_per_node=launcher.tasks_per_node, gpus_per_node=launcher.gpus_per_node,
        cpus_per_task=launcher.cpus_per_task, mem=f"{launcher.mem_gb}GB", signal_delay_s=launcher.signal_delay_s,
        setup=list(launcher.setup))
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=myproj", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --signal=USR2@120", "#SBATCH --time=240",
                 "module load cuda/12.4", "source .venv/bin/activate"):
        assert line in script, line
