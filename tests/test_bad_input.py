"""Bad input through the real entry point: exit code 2, one line naming the file, row or key, nothing left behind.

Each case runs `python -m pipeline ...` in-process (Hydra's real app, ~0.3 s a case instead of a
fresh interpreter) against one shared store, so the tiny model is built once. Data cases run the
pair stage on a file written by the case; config cases stop in validation before any stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FIXTURES = Path(__file__).parent / "fixtures"


def run_cli(args: list[str], run_dir: Path, capsys) -> tuple[int, str]:
    """`python -m pipeline <args>` in this process; (exit code, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.__main__ import main

    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["pipeline", *args, f"hydra.run.dir={run_dir}"]
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-store")
    return root


def partial_dirs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*.partial"))


# ------------------------------------------------------------------ data files, every schema

ROWS = {  # one good row per schema, in the layout auto-detection recognises
    "prompt_chosen_rejected": {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
    "chat_messages": {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    "transcript": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
    "scored_completions": {"prompt": "Say hi.", "completions": ["hi", "no"], "scores": [2.0, 1.0]},
    "multiple_choice": {"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
    "unpaired": {"prompt": "2 + 2?", "completion": "4", "label": True},
}
# The field each schema cannot do without (removed, retyped or set to NaN by the cases below).
KEY_FIELD = {"prompt_chosen_rejected": "rejected", "chat_messages": "chosen", "transcript": "rejected",
             "scored_completions": "completions", "multiple_choice": "choices", "unpaired": "completion"}
WRONG_TYPE = {"prompt_chosen_rejected": 5, "chat_messages": "not a list", "transcript": ["a", "b"],
              "scored_completions": "one string", "multiple_choice": 7, "unpaired": {"text": "x"}}


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def bad_file(schema: str, case: str) -> tuple[str, bytes, str]:
    """(file name, content, a fragment the one-line error must contain) for one schema and defect."""
    good = ROWS[schema]
    rows = [dict(good) for _ in range(3)]
    key = KEY_FIELD[schema]
    if case == "empty":
        return "data.jsonl", b"", "empty"
    if case == "truncated":
        return "data.jsonl", jsonl(rows)[:-12], "line 3"
    if case == "non_utf8":
        return "data.jsonl", jsonl(rows[:1]) + b'{"prompt": "caf\xe9"}\n', "UTF-8"
    if case == "wrong_type":
        rows[1][key] = WRONG_TYPE[schema]
        return "data.jsonl", jsonl(rows), f"row 2"
    if case == "missing_column":
        for row in rows:
            row.pop(key)
        return "data.jsonl", jsonl(rows), "data.schema" if schema != "unpaired" else key
    if case == "nan":  # NaN in the key field of every row: nothing usable is left
        body = "".join(json.dumps({**r, key: None}).replace("null", "NaN") + "\n" for r in rows)
        return "data.jsonl", body.encode(), ""
    if case == "duplicated_column":  # a CSV whose header names a column twice
        header = "prompt,chosen,rejected,rejected\n" if schema == "prompt_chosen_rejected" else None
        return "data.csv", (header + "two plus two,four,five,six\n").encode(), "more than once"
    if case == "lone_surrogate":  # an escaped UTF-16 half with no partner: no Unicode text, cannot be stored
        return "data.jsonl", jsonl(rows[:1]) + b'{"prompt": "p", "chosen": "a\\udc00", "rejected": "b"}\n', "line 2"
    if case == "duplicated_parquet_column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        buffer = pa.BufferOutputStream()
        table = pa.Table.from_arrays([pa.array(["q"]), pa.array(["a"]), pa.array(["b"]), pa.array(["c"])],
                                     names=["prompt", "chosen", "rejected", "rejected"])
        pq.write_table(table, buffer)
        return "data.parquet", buffer.getvalue().to_pybytes(), "more than once"
    raise ValueError(case)


DATA_CASES = [(schema, case) for schema in ROWS
              for case in ("empty", "truncated", "non_utf8", "wrong_type", "missing_column", "nan")]
DATA_CASES += [("prompt_chosen_rejected", case) for case in ("duplicated_column", "lone_surrogate",
                                                              "duplicated_parquet_column")]


@pytest.mark.parametrize("schema,case", DATA_CASES, ids=[f"{s}-{c}" for s, c in DATA_CASES])
def test_bad_data_file(schema, case, store, tmp_path, capsys):
    name, content, fragment = bad_file(schema, case)
    path = tmp_path / name
    path.write_bytes(content)
    schema_arg = [] if case == "missing_column" else [f"data.schema={schema}"]
    code, err = run_cli(["stages=[pair]", "model=tiny", "logger=none", f"artifacts_dir={store}", "data=local",
                         f"data.path={path}", *schema_arg], tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0] and fragment in lines[0], lines[0]
    assert partial_dirs(store) == []


# ------------------------------------------------------------------ config keys

NUMERIC_KEYS = {  # key -> (out of range, fractional where a whole number is expected or None)
    "seed": ("-1", "1.5"),
    "method.beta": ("0", None),
    "train.lr": ("-1e-5", None),
    "train.max_steps": ("0", "2.5"),
    "train.batch_size": ("0", "2.5"),
    "train.grad_accumulation": ("0", "1.5"),
    "train.max_length": ("-1", "64.5"),
    "train.warmup_ratio": ("1.5", None),
    "train.max_grad_norm": ("0", None),
    "pairing.test_fraction": ("1.5", None),
    "data.num_problems": ("0", "10.5"),
    "data.eval_choices": ("5", "2.5"),
    "data.eval_max_operand": ("1", "10.5"),
    "eval.limit": ("0", "2.5"),
}
CONFIG_CASES = []
for key, (out_of_range, fractional) in NUMERIC_KEYS.items():
    CONFIG_CASES += [(key, out_of_range), (key, "abc"), (key, "inf")]
    if fractional:
        CONFIG_CASES.append((key, fractional))


@pytest.mark.parametrize("key,value", CONFIG_CASES, ids=[f"{k}={v}" for k, v in CONFIG_CASES])
def test_bad_numeric_setting(key, value, store, tmp_path, capsys):
    code, err = run_cli([f"{key}={value}", "model=tiny", "logger=none", f"artifacts_dir={store}"], tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"{key}=" in lines[0], err
    assert not (tmp_path / "run" / "run.json").exists() or json.loads((tmp_path / "run" / "run.json").read_text())[
        "artifacts"] == {}  # stopped before any stage
    assert partial_dirs(store) == []


def test_more_eval_items_than_distinct_questions(store, tmp_path, capsys):
    code, err = run_cli(["data.num_eval_items=200", "data.eval_max_operand=10", "model=tiny", "logger=none",
                         f"artifacts_dir={store}"], tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "only 102 distinct questions with data.eval_max_operand=10" in lines[0], err
    assert partial_dirs(store) == []


# ------------------------------------------------------------------ paths

def test_paths(store, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["data=local", f"data.path={tmp_path / 'missing.jsonl'}"], "file not found"),
        (["data=local", f"data.path={tmp_path}"], "is a directory"),
        ([f"artifacts_dir={a_file / 'store'}"], "is a file"),
        (["sweep_name=../../outside"], "sweep_name="),
        (["sweep_name=/abs/path"], "sweep_name="),
    ]
    for args, fragment in cases:
        base = [] if any(a.startswith("artifacts_dir") for a in args) else [f"artifacts_dir={store}"]
        code, err = run_cli(["model=tiny", "logger=none", *base, *args], tmp_path / "run", capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, err)
    assert not (REPO_ROOT.parent / "outside").exists()


def test_unknown_store_verify_mode(store, tmp_path, capsys):
    code, err = run_cli(["store_verify=sometimes", "model=tiny", "logger=none", f"artifacts_dir={store}"],
                        tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "store_verify='sometimes'" in lines[0] and "small" in lines[0], err


# ------------------------------------------------------------------ settings that used to fail only after work was done

LATE_FAILURES = [  # (arguments, fragment of the one line)
    (["seed=4294967296"], "seed=4294967296: expected a whole number in [0, 2**32)"),
    (["data.seed=5000000000"], "data.seed=5000000000"),
    (["model.tiny.seed=-1"], "model.tiny.seed=-1"),
    (["eval.fewshot_seed=4294967296"], "eval.fewshot_seed=4294967296"),
    (["pairing.bucket_edges=[0.0,1.0]"], "pairing.bucket_edges=[0.0, 1.0]: two edges make one bucket"),
    (["pairing.bucket_edges=[0.5,0.2,1.0]"], "strictly increasing"),
    (["pairing.bucket_edges=[0.0,0.2,0.2,1.0]"], "strictly increasing"),
    (["pairing.bucket_edges=null", "pairing.quantiles=1"], "pairing.quantiles=1"),
    (["pairing.bucket_edges=null", "pairing.quantiles=true"], "pairing.quantiles=True"),
    (["data.num_eval_items=8", "eval.fewshot_pool=8"], "data.num_eval_items=8"),
]


@pytest.mark.parametrize("args,fragment", LATE_FAILURES, ids=[" ".join(a) for a, _ in LATE_FAILURES])
def test_settings_that_fail_late_are_refused_before_any_stage(args, fragment, store, tmp_path, capsys):
    code, err = run_cli([*args, "model=tiny", "logger=none", f"artifacts_dir={store}"], tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err
    record = tmp_path / "run" / "run.json"
    assert not record.exists() or json.loads(record.read_text())["artifacts"] == {}  # stopped before any stage
    assert partial_dirs(store) == []


def test_the_own_data_command_with_the_local_suite_stops_before_training(store, tmp_path, capsys):
    """The local suite reads held-out items only synthetic data writes: refused before the first stage, not after training."""
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(jsonl([ROWS["prompt_chosen_rejected"]] * 3))
    code, err = run_cli(["data=local", f"data.path={data}", "method=bnf", "model=tiny", "logger=none",
                         f"artifacts_dir={store}"], tmp_path / "run", capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "eval.tasks.local_mc.source=eval_mc.jsonl" in lines[0], err
    assert "eval=none" in lines[0] and not list(Path(store).glob("train/*"))
