"""The store trusts nothing it finds: folder names, leftover partial folders, links, run records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from filelock import FileLock

from pipeline.store import artifacts
from pipeline.store.artifacts import MANIFEST, build
from pipeline.training.checkpointing import checkpoint_path, load_checkpoint, save_checkpoint
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    monkeypatch.setattr(artifacts, "_reported", set())


def make(root, lr, calls, resumable=False, stage="trust_probe"):
    """A stage whose output depends on its config (``lr``); counts how often it is computed."""

    def compute(workdir):
        calls.append(lr)
        (workdir / "model").mkdir(exist_ok=True)
        (workdir / "model" / "weights.txt").write_text(f"trained with lr={lr}")

    return build(root, stage, {"lr": lr}, {}, compute, resumable=resumable)


def store_lines(out):
    return [line for line in out.splitlines() if line.startswith("[store]")]


# ------------------------------------------------------------------ a cached artifact proves its key

def test_a_folder_copied_under_another_key_is_refused_and_recomputed(tmp_path, capsys):
    calls = []
    low, high = make(tmp_path, 0.1, calls), make(tmp_path, 0.2, calls)
    shutil.rmtree(high.path)
    shutil.copytree(low.path, high.path)  # lr=0.1's result now sits under lr=0.2's key
    capsys.readouterr()
    again = make(tmp_path, 0.2, calls)
    lines = store_lines(capsys.readouterr().out)
    assert not again.cached and calls == [0.1, 0.2, 0.2]
    assert len(lines) == 1 and f"written for trust_probe/{low.key}" in lines[0] and high.key in lines[0], lines
    assert (again.path / "model" / "weights.txt").read_text() == "trained with lr=0.2"
    assert json.loads((again.path / MANIFEST).read_text())["config"] == {"lr": 0.2}


def test_a_manifest_edited_to_claim_another_key_is_refused(tmp_path, capsys):
    """Key and stage rewritten to the folder's: the config in the manifest still hashes to the old key."""
    calls = []
    low, high = make(tmp_path, 0.1, calls), make(tmp_path, 0.2, calls)
    shutil.rmtree(high.path)
    shutil.copytree(low.path, high.path)
    manifest = json.loads((high.path / MANIFEST).read_text())
    manifest["key"] = high.key
    (high.path / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    again = make(tmp_path, 0.2, calls)
    lines = store_lines(capsys.readouterr().out)
    assert not again.cached and len(lines) == 1 and f"give key {low.key}, not {high.key}" in lines[0], lines


def test_an_untouched_artifact_is_still_found(tmp_path, capsys):
    calls = []
    make(tmp_path, 0.1, calls)
    assert make(tmp_path, 0.1, calls).cached and calls == [0.1]
    assert store_lines(capsys.readouterr().out) == []


# ------------------------------------------------------------------ checkpoints belong to one artifact

def tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_a_checkpoint_copied_into_another_keys_partial_folder_is_not_resumed(tmp_path, capsys):
    model, optimizer, scheduler = tiny_training_state()
    mine, other = tmp_path / "train" / "aaaaaaaaaaaa.partial", tmp_path / "train" / "bbbbbbbbbbbb.partial"
    save_checkpoint(mine, step=2, position=8, model=model, optimizer=optimizer, scheduler=scheduler)
    assert load_checkpoint(mine)["step"] == 2  # its own folder: resumed
    shutil.copytree(mine, other)
    capsys.readouterr()
    assert load_checkpoint(other) is None
    out = capsys.readouterr().out
    assert "written for train/aaaaaaaaaaaa, not train/bbbbbbbbbbbb" in out and "starts from step 0" in out


def test_a_checkpoint_that_names_no_artifact_is_not_resumed(tmp_path, capsys):
    """A checkpoint file written without the owner (an older or hand-made one) cannot prove its key."""
    from safetensors.torch import save_file

    from pipeline.training.checkpointing import STATE_KEY, to_skeleton
    model, optimizer, scheduler = tiny_training_state()
    tensors = {}
    skeleton = to_skeleton({"step": 1, "position": 4, "model": dict(model.state_dict()),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": {},
                            "extra": {}}, tensors, "state")
    path = checkpoint_path(tmp_path / "train" / "cccccccccccc.partial")
    path.parent.mkdir(parents=True)
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(skeleton)})
    assert load_checkpoint(path.parent.parent) is None
    assert "written for an unnamed artifact" in capsys.readouterr().out


# ------------------------------------------------------------------ leftovers never reach the manifest

def test_files_planted_in_a_resumable_partial_folder_are_never_published(tmp_path, capsys):
    probe = make(tmp_path / "probe", 0.3, [])  # learn the key
    partial = tmp_path / "store" / "trust_probe" / f"{probe.key}.partial"
    (partial / "checkpoints").mkdir(parents=True)
    (partial / "checkpoints" / "state.safetensors").write_text("resumable state")
    (partial / "model").mkdir()
    (partial / "model" / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # would change evaluation
    (partial / "tasks").mkdir()
    (partial / "tasks" / "evil.yaml").write_text("!function evil.process_docs")
    seen = []

    def compute(workdir):
        seen.append(sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()))
        (workdir / "model").mkdir(exist_ok=True)
        (workdir / "model" / "weights.txt").write_text("trained")
        shutil.rmtree(workdir / "checkpoints")

    built = build(tmp_path / "store", "trust_probe", {"lr": 0.3}, {}, compute, resumable=("checkpoints",))
    assert seen == [["checkpoints/state.safetensors"]]  # the resumable state is handed over, nothing else
    published = [entry["path"] for entry in json.loads((built.path / MANIFEST).read_text())["files"]]
    assert published == ["model/weights.txt"]
    lines = store_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "model/" in lines[0] and "tasks/" in lines[0], lines


# ------------------------------------------------------------------ symbolic links are refused

def test_a_linked_file_inside_an_artifact_is_refused(tmp_path, capsys):
    calls = []
    made = make(tmp_path / "store", 0.1, calls)
    outside = tmp_path / "outside.txt"
    outside.write_text("trained with lr=0.1")  # same bytes: size and sha256 agree
    (made.path / "model" / "weights.txt").unlink()
    (made.path / "model" / "weights.txt").symlink_to(outside)
    capsys.readouterr()
    again = make(tmp_path / "store", 0.1, calls)
    lines = store_lines(capsys.readouterr().out)
    assert not again.cached and len(lines) == 1 and "model/weights.txt is a symbolic link" in lines[0], lines
    assert not (again.path / "model" / "weights.txt").is_symlink() and outside.read_text() == "trained with lr=0.1"


def test_an_artifact_folder_that_is_a_link_is_refused(tmp_path, capsys):
    calls = []
    made = make(tmp_path / "elsewhere", 0.1, calls)
    probe_key = made.key
    (tmp_path / "store" / "trust_probe").mkdir(parents=True)
    (tmp_path / "store" / "trust_probe" / probe_key).symlink_to(made.path)
    capsys.readouterr()
    again = make(tmp_path / "store", 0.1, calls)
    out = capsys.readouterr().out
    assert not again.cached and "folder is a symbolic link" in out
    assert not again.path.is_symlink() and made.path.is_dir() and calls == [0.1, 0.1]  # the target is left alone


@pytest.mark.parametrize("resumable", [False, ("checkpoints",)])
def test_a_partial_folder_linked_outside_the_store_is_never_written_through(tmp_path, capsys, resumable):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the store's")
    probe = make(tmp_path / "probe", 0.1, [])
    stage_dir = tmp_path / "store" / "trust_probe"
    stage_dir.mkdir(parents=True)
    (stage_dir / f"{probe.key}.partial").symlink_to(outside)
    made = make(tmp_path / "store", 0.1, [], resumable=resumable)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"] and (outside / "keep.txt").read_text() == "not the store's"
    assert (made.path / "model" / "weights.txt").is_file() and not made.path.is_symlink()
    assert "a symbolic link in place of a work folder" in capsys.readouterr().out


def test_a_lock_linked_outside_the_store_does_not_truncate_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("data outside the store")
    probe = make(tmp_path / "probe", 0.1, [])
    stage_dir = tmp_path / "store" / "trust_probe"
    stage_dir.mkdir(parents=True)
    (stage_dir / f"{probe.key}.lock").symlink_to(target)
    make(tmp_path / "store", 0.1, [])
    assert target.read_text() == "data outside the store"


def test_a_link_written_by_the_stage_is_not_published(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")

    def compute(workdir):
        (workdir / "out.txt").write_text("ok")
        (workdir / "leak.txt").symlink_to(secret)

    built = build(tmp_path / "store", "trust_probe", {"lr": 9}, {}, compute)
    published = [entry["path"] for entry in json.loads((built.path / MANIFEST).read_text())["files"]]
    assert published == ["out.txt"] and secret.read_text() == "outside"
    assert "leak.txt: a symbolic link is never published" in capsys.readouterr().out


def test_a_stage_folder_linked_out_of_the_store_is_a_user_error(tmp_path):
    from pipeline.errors import UserError
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "trust_probe").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="stage folder is a symbolic link"):
        make(tmp_path / "store", 0.1, [])
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ------------------------------------------------------------------ gc keeps what it cannot rule out

def gc(root, runs, *args):
    result = subprocess.run([sys.executable, "-m", "pipeline.store", "--root", str(root), "--runs", str(runs), "gc", *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def record(runs, name, *used):
    folder = runs / name
    folder.mkdir(parents=True)
    text = json.dumps({"status": "ok", "artifacts": {a.stage: {"key": a.key, "path": str(a.path)} for a in used}})
    (folder / "run.json").write_text(text)
    return folder / "run.json"


@pytest.mark.parametrize("damage", ["torn", "unreadable"])
def test_gc_keeps_the_artifacts_of_a_run_record_it_cannot_read(tmp_path, damage):
    root, runs = tmp_path / "store", tmp_path / "runs"
    kept, other = make(root, 0.1, []), make(root, 0.2, [])
    record(runs, "a", other)
    damaged = record(runs, "b", kept)
    if damage == "torn":
        damaged.write_text(damaged.read_text()[:20])  # killed while written by hand, copied half, ...
    else:
        damaged.write_bytes(b"\xff\xfe" + damaged.read_bytes())  # not text at all
    out = gc(root, runs, "--yes")
    assert kept.path.is_dir() and other.path.is_dir()
    assert f"run record {damaged}" in out and "keeps every artifact" in out
    damaged.unlink()
    assert "removed 1 artifact(s)" in gc(root, runs, "--yes") and not kept.path.exists() and other.path.is_dir()


def test_gc_never_collects_a_running_recompute_nor_its_artifact(tmp_path):
    """recompute=[...] works in <key>.partial beside the published artifact, holding the key's lock."""
    root, runs = tmp_path / "store", tmp_path / "runs"
    made = make(root, 0.1, [])
    partial = made.path.with_name(f"{made.key}.partial")
    partial.mkdir()
    (partial / "checkpoints").mkdir()
    with FileLock(str(made.path.with_name(f"{made.key}.lock"))):
        out = gc(root, runs, "--yes")
    assert partial.is_dir() and made.path.is_dir(), out
    assert f"skipped {partial}" in out and f"skipped trust_probe/{made.key}" in out
    out = gc(root, runs, "--yes")  # the job is gone: both go
    assert not partial.exists() and not made.path.exists(), out


# ------------------------------------------------------------------ full disk: one line naming the path

def test_a_full_disk_while_computing_is_one_line_naming_the_path(tmp_path):
    """/dev/full fails every write with ENOSPC: the real error a full disk gives."""
    from pipeline.errors import UserError

    def compute(workdir):
        (workdir / "half.bin").write_bytes(b"x" * 10)
        with open("/dev/full", "wb") as handle:
            handle.write(b"y" * 100_000)
            handle.flush()

    with pytest.raises(UserError) as caught:
        build(tmp_path, "trust_probe", {"disk": "full"}, {}, compute)
    message = str(caught.value)
    assert "the disk is full (ENOSPC)" in message and "trust_probe/" in message and "\n" not in message
    assert "nothing was published" in message
    assert not list((tmp_path / "trust_probe").glob("*/manifest.json")) and not list((tmp_path / "trust_probe").glob("*.partial"))
    with pytest.raises(UserError, match="partial work stays in"):
        build(tmp_path, "trust_probe", {"disk": "full"}, {}, compute, resumable=("checkpoints",))
    assert len(list((tmp_path / "trust_probe").glob("*.partial"))) == 1
