"""A large artifact file overwritten in place after publication (not hashed by store_verify=small): one line
naming it when read, and the next run recomputes the artifact instead of failing the same way again."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.store import artifacts
from pipeline.stages import pair
from pipeline.errors import UserError
from tests.conftest import compose_config


def big_local_data(path, rows=20_000):
    """Enough distinct pairs that pairs.parquet passes the 1 MiB hashing cap."""
    import json
    import random
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    with path.open("w") as handle:
        for i in range(rows):
            text = " ".join(rng.choice(words) for _ in range(12))
            handle.write(json.dumps({"prompt": f"q{i} {text}", "chosen": f"{text} {i}", "rejected": f"{i} {text[::-1]}"}) + "\n")


def test_an_overwritten_large_pairs_file_is_one_line_then_recomputed(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_reported", set())
    data, root = tmp_path / "prefs.jsonl", tmp_path / "store"
    big_local_data(data)
    cfg = compose_config(f"artifacts_dir={root}", "data=local", f"data.path={data}", "logger=none", "stages=[pair]")
    built = pair.run(cfg, {}, root)
    table = built.path / "pairs.parquet"
    size = table.stat().st_size
    assert size > artifacts.SMALL_FILE_BYTES  # above the cap: found on its size alone
    with table.open("r+b") as handle:  # a partial overwrite in place: same size, other bytes
        handle.seek(size // 3)
        handle.write(b"\0" * 4096)
    found = pair.run(cfg, {}, root)
    assert found.cached  # store_verify=small does not hash it
    with pytest.raises(UserError) as caught:
        pair.load_pairs(found)
    message = str(caught.value)
    assert "\n" not in message and str(table) in message and "differs from its sha256" in message
    assert "next run recomputes it" in message
    again = pair.run(cfg, {}, root)  # the next run: recomputed, readable
    assert not again.cached and again.key == built.key
    assert len(pair.load_pairs(again)) == len(pd.read_parquet(again.path / "pairs.parquet"))


def test_a_file_that_matches_its_manifest_keeps_its_own_error(tmp_path):
    """Not damage: a reader bug surfaces as itself, and the artifact stays."""
    from pipeline.store.artifact_reads import read_artifact_file
    built = artifacts.build(tmp_path, "reads_probe", {}, {}, lambda workdir: (workdir / "x.txt").write_text("fine") and None)

    def broken_reader(path):
        raise KeyError("a reader bug")

    with pytest.raises(KeyError):
        read_artifact_file(built.path / "x.txt", broken_reader)
    assert (built.path / "manifest.json").is_file()
