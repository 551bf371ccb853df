"""How work splits over the processes of a launch (pipeline/store/distributed.py), and the evaluation backend
settings that depend on it. The real two-process runs are in tests/test_multiprocess.py."""

from __future__ import annotations

import pytest

from pipeline.store.distributed import gather, shard
from pipeline.errors import UserError
from pipeline.orchestration.validate import validate
from tests.conftest import compose_config


@pytest.mark.parametrize("count,processes,expected", [
    (7, 2, [range(0, 4), range(4, 7)]),            # the first rank takes the extra row
    (8, 2, [range(0, 4), range(4, 8)]),
    (10, 4, [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]),
    (1, 3, [range(0, 1), range(1, 1), range(1, 1)]),  # more ranks than rows: the others score nothing
    (0, 2, [range(0, 0), range(0, 0)]),
])
def test_shards_are_contiguous_and_cover_every_row_once_in_order(count, processes, expected):
    shards = [shard(count, rank, processes) for rank in range(processes)]
    assert shards == expected
    assert [row for part in shards for row in part] == list(range(count))


def test_gather_in_one_process_is_the_value_alone():
    assert gather({"rows": 3}) == [{"rows": 3}]


def test_unknown_eval_backend_is_one_line():
    with pytest.raises(UserError, match=r"eval.backend='vlm': expected one of \['hf', 'vllm'\]"):
        validate(compose_config("eval.backend=vlm"))


def test_vllm_backend_without_vllm_installed_is_one_line(monkeypatch):
    import importlib.util
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match=r"eval.backend=vllm: the vllm package is not installed .*pip install vllm"):
        validate(compose_config("eval.backend=vllm", "stages=[pair,reference,evaluate]"))
    validate(compose_config("eval.backend=vllm", "stages=[pair,reference]"))  # no evaluate stage: nothing to refuse
    validate(compose_config("eval.backend=vllm", "eval=none", "stages=[pair,reference,evaluate]"))


def test_vllm_backend_under_several_processes_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"eval.backend=vllm: run it from ONE process"):
        validate(compose_config("eval.backend=vllm", "stages=[pair,reference,evaluate]"))
