"""The shared store holds against interrupted writes, torn rows and planted files."""

from __future__ import annotations

import json
import pathlib

import pytest

from pipeline.training.checkpointing import truncate_jsonl


def write_rows(path, steps):
    path.write_text("".join(json.dumps({"step": s, "train/loss": 0.5}) + "\n" for s in steps))


def test_truncate_keeps_rows_up_to_the_checkpoint_and_drops_a_torn_row(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    write_rows(log, [1, 2, 3, 4])
    with log.open("a") as handle:
        handle.write('{"step": 5, "train/lo')  # killed mid-append
    assert truncate_jsonl(log, 3) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    assert "line 5: incomplete row" in capsys.readouterr().out


def test_a_kill_while_truncating_never_empties_the_log(tmp_path, monkeypatch):
    """The rewrite opens (and so truncates) a file, then dies before writing: the log must survive whole."""
    log = tmp_path / "metrics.jsonl"
    write_rows(log, [1, 2, 3, 4])
    before = log.read_text()

    def killed_write(self, data, *args, **kwargs):
        self.open("w").close()  # the open has truncated the target ...
        raise KeyboardInterrupt  # ... and the process dies before the data is written

    monkeypatch.setattr(pathlib.Path, "write_text", killed_write)
    with pytest.raises(KeyboardInterrupt):
        truncate_jsonl(log, 2)
    monkeypatch.undo()
    assert log.read_text() == before


# ------------------------------------------------------------------ checkpoints hold no pickle

import os  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.store import artifacts  # noqa: E402
from pipeline.store.artifacts import build  # noqa: E402
from pipeline.training.checkpointing import checkpoint_path, load_checkpoint, restore_checkpoint, save_checkpoint  # noqa: E402


class Planted:
    """Unpickling this runs a shell command that creates ``marker``: what a hostile store file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def small_training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(2):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_checkpoint_round_trip_restores_weights_optimiser_and_random_streams(tmp_path):
    model, optimizer, scheduler = small_training_state()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    save_checkpoint(tmp_path, step=2, position=9, model=model, optimizer=optimizer, scheduler=scheduler,
                    extra={"probe": [1, 2], "nested": {"ok": True}})
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    fresh_model, fresh_optimizer, fresh_scheduler = small_training_state()
    for parameter in fresh_model.parameters():
        parameter.data.zero_()
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and state["position"] == 9 and state["extra"] == {"probe": [1, 2], "nested": {"ok": True}}
    restore_checkpoint(state, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()))
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"] and saved["state"].keys() == restored["state"].keys()
    for index in saved["state"]:
        for name, value in saved["state"][index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][index][name])), (index, name)
    assert scheduler.state_dict()["last_epoch"] == fresh_scheduler.state_dict()["last_epoch"] == 2
    # The random streams continue exactly where they were when the checkpoint was taken.
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws


def test_a_planted_pickle_in_a_checkpoint_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = checkpoint_path(tmp_path)
    path.parent.mkdir(parents=True)
    payload = pickle.dumps(Planted(marker))
    for name in ("state.pt", path.name):  # the old checkpoint name, and ours
        (path.parent / name).write_bytes(payload)
    assert pickle.loads(payload) == 0 and marker.exists()  # the payload is live ...
    marker.unlink()
    assert load_checkpoint(tmp_path) is None  # ... and loading the checkpoint does not run it
    assert not marker.exists()
    assert "not a readable checkpoint" in capsys.readouterr().out


# ------------------------------------------------------------------ found artifacts are checked against their manifest

def make_artifact(root, calls):
    """A stage with a small text file, a >1 MiB file and a JSONL log; counts how often it is computed."""

    def compute(workdir):
        calls.append(1)
        (workdir / "small.txt").write_text("hello")
        (workdir / "big.bin").write_bytes(b"\0" * (artifacts.SMALL_FILE_BYTES + 10))
        (workdir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n\n{"step": 3}\n')
        (workdir / "sub").mkdir()
        (workdir / "sub" / "notes.txt").write_text("x")

    return build(root, "verify_probe", {}, {}, compute)


def flip_first_byte(path):
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))


TAMPERING = {  # name -> (change, fragment of the one line, modes that must notice it)
    "edited small file": (lambda p: flip_first_byte(p / "small.txt"), "small.txt differs", {"small", "full"}),
    "edited big file": (lambda p: flip_first_byte(p / "big.bin"), "big.bin differs", {"full"}),
    "resized file": (lambda p: (p / "small.txt").write_text("hello!"), "small.txt has 6 bytes", {"size", "small", "full"}),
    "missing file": (lambda p: (p / "sub" / "notes.txt").unlink(), "sub/notes.txt is missing", {"size", "small", "full"}),
    "planted file": (lambda p: (p / "sub" / "evil.yaml").write_text("!function x.y"), "sub/evil.yaml is not in the manifest",
                     {"size", "small", "full"}),
    "torn manifest": (lambda p: (p / "manifest.json").write_text('{"files": ['), "manifest.json unreadable",
                      {"size", "small", "full"}),
}


@pytest.mark.parametrize("mode", artifacts.VERIFY_MODES)
@pytest.mark.parametrize("change", TAMPERING)
def test_a_changed_artifact_is_recomputed_with_one_line(tmp_path, capsys, monkeypatch, change, mode):
    monkeypatch.setattr(artifacts, "_reported", set())
    calls = []
    first = make_artifact(tmp_path, calls)
    assert make_artifact(tmp_path, calls).cached and len(calls) == 1  # untouched: found and reused
    tamper, fragment, noticed_by = TAMPERING[change]
    tamper(first.path)
    capsys.readouterr()
    with artifacts.verifying(mode):
        again = make_artifact(tmp_path, calls)
    out = capsys.readouterr().out
    if mode in noticed_by:
        assert not again.cached and len(calls) == 2
        lines = [line for line in out.splitlines() if line.startswith("[store]")]
        assert len(lines) == 1 and fragment in lines[0] and "recomputed" in lines[0], out
        assert artifacts.mismatch(again.path, "full") is None  # the recomputed artifact is whole again
    else:
        assert again.cached and len(calls) == 1 and "[store]" not in out


def test_manifest_records_the_rows_of_logs_and_tables(tmp_path):
    import pandas as pd

    def compute(workdir):
        (workdir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n\n{"step": 3}\n')
        pd.DataFrame({"a": range(5)}).to_parquet(workdir / "pairs.parquet")
        (workdir / "notes.txt").write_text("no rows here\n")

    artifact = build(tmp_path, "rows_probe", {}, {}, compute)
    files = {entry["path"]: entry for entry in json.loads((artifact.path / "manifest.json").read_text())["files"]}
    assert files["metrics.jsonl"]["rows"] == 3 and files["pairs.parquet"]["rows"] == 5
    assert "rows" not in files["notes.txt"]


def test_a_run_waiting_for_another_process_says_which_artifact(tmp_path, capsys, monkeypatch):
    """Another process holds the artifact's lock: the waiting run says so (once), then builds when it is free."""
    monkeypatch.setattr(artifacts, "LOCK_NOTICE_AFTER_S", 0.2)
    probe = build(tmp_path / "probe", "lock_probe", {}, {}, lambda workdir: None)  # learn the key
    lock = tmp_path / "store" / "lock_probe" / f"{probe.key}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom filelock import FileLock\n"
        f"with FileLock({str(lock)!r}):\n    print('held', flush=True)\n    time.sleep(1.5)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    built = build(tmp_path / "store", "lock_probe", {}, {}, lambda workdir: None)
    waited = time.monotonic() - started
    holder.wait()
    out = capsys.readouterr().out
    assert not built.cached and waited > 0.5  # it did wait for the holder
    notices = [line for line in out.splitlines() if "another process is computing it" in line]
    assert len(notices) == 1 and f"lock_probe/{probe.key}" in notices[0] and str(lock) in notices[0], out
