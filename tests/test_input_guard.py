"""A data file rewritten while a run waits for the store's lock is never stored under the old content's key."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from pipeline.store import artifacts
from pipeline.stages import pair
from pipeline.store.artifacts import artifact_key
from pipeline.store.code_version import code_identity
from pipeline.errors import UserError
from tests.conftest import compose_config


def rows(answer: str) -> bytes:
    return "".join(json.dumps({"prompt": f"{i} + {i}?", "chosen": str(2 * i), "rejected": answer + str(i)}) + "\n"
                   for i in range(6)).encode()


def test_a_file_rewritten_while_waiting_for_the_lock_is_not_stored_under_the_old_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(artifacts, "LOCK_NOTICE_AFTER_S", 0.05)
    data, root = tmp_path / "prefs.jsonl", tmp_path / "store"
    data.write_bytes(rows("x"))
    cfg = compose_config(f"artifacts_dir={root}", "data=local", f"data.path={data}", "logger=none", "stages=[pair]")
    key = artifact_key("pair", pair.resolved_subset(cfg), {}, code_identity("pair"))  # the key of the old content
    lock, release = root / "pair" / f"{key}.lock", tmp_path / "release"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\nfrom filelock import FileLock\n"
        f"with FileLock({str(lock)!r}):\n    print('held', flush=True)\n"
        f"    while not pathlib.Path({str(release)!r}).exists():\n        time.sleep(0.02)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    outcome = {}

    def run_pair():
        try:
            outcome["artifact"] = pair.run(cfg, {}, root)
        except UserError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=run_pair)
    worker.start()
    seen = ""
    for _ in range(3000):  # until the run has hashed the file and waits for the lock
        seen += capsys.readouterr().out
        if "another process is computing it" in seen:
            break
        time.sleep(0.02)
    assert "another process is computing it" in seen
    data.write_bytes(rows("y"))  # rewritten while the run waits
    release.touch()
    worker.join()
    holder.wait()
    assert "artifact" not in outcome, "stored under the old content's key"
    assert f"data.path={data}: the file changed" in outcome["error"]
    assert not (root / "pair" / key / "manifest.json").exists()
    # The next run hashes the new content: a new key, computed and stored.
    fresh = pair.run(cfg, {}, root)
    assert fresh.key != key and not fresh.cached


def test_an_unchanged_file_is_stored_as_before(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(rows("x"))
    cfg = compose_config(f"artifacts_dir={tmp_path / 'store'}", "data=local", f"data.path={data}", "logger=none")
    first = pair.run(cfg, {}, tmp_path / "store")
    assert not first.cached and pair.run(cfg, {}, tmp_path / "store").cached
