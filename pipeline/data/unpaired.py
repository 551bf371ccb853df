"""One-sided rows: a prompt with only a chosen or only a rejected response (losses with ``accepts_unpaired``).

Two sources, one representation (a row of the pairs' layout whose absent side is None; to the loss, an
all-zero mask, see ``pipeline.training.losses.LossInput``):

- ``data.schema=unpaired``: the pair stage writes ``unpaired.parquet`` (row_id, prompt, raw_prompt,
  completion, label, split). ``load_rows`` gives it the pairs' columns: ``pair_id`` = row_id, the
  completion under ``chosen`` when its label is true (``rejected`` None) and under ``rejected`` when
  false, bucket and kind ``"unpaired"``. The reference stage scores each response ALONE
  (``scoring.response_forward``: one row, no padding) into ``unpaired.safetensors``, and the trainer,
  the probes and the evaluation score it the same way, so the first training forward reproduces the
  stored log-probs bit for bit, as ``scoring.pair_forward`` does for pairs.
- ``train.drop_one_side=true``: the train stage keeps one side of each training pair (``kept_sides``:
  drawn from the run's ``seed`` and the pair id), so pairs, reference, probes and evaluation are the
  paired run's. The pair is still forwarded in its own pair layout, so the kept side's log-probs equal
  the stored reference's at step 0; the dropped side's results never reach the loss.

Only losses whose method file sets ``accepts_unpaired: true`` (BNF) train on such rows; ``refusal``
is the one line every other method gets (pipeline/orchestration/validate.py from the config, the train stage for an
auto-detected unpaired file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pipeline.store.artifact_reads import read_artifact_file
from pipeline.errors import UserError

UNPAIRED_FILE = "unpaired.parquet"  # written by the pair stage (data.schema=unpaired)
BUCKET = KIND = "unpaired"  # bucket and kind of a one-sided row (it has no edit distance)


def load_rows(pair_path: Path | str) -> pd.DataFrame | None:
    """The pair artifact's one-sided rows in the pairs' layout (None when it has no unpaired.parquet)."""
    path = Path(pair_path) / UNPAIRED_FILE
    if not path.is_file():
        return None
    raw = read_artifact_file(path, pd.read_parquet)
    label = raw["label"].astype(bool)
    completion = raw["completion"].astype(object)
    return pd.DataFrame({
        "pair_id": raw["row_id"].astype(str),
        "prompt": raw["prompt"], "raw_prompt": raw["raw_prompt"],
        "chosen": completion.where(label, None), "rejected": completion.where(~label, None),
        "label": label, "split": raw["split"], "bucket": BUCKET, "kind": KIND,
    })


def one_sided(frame: pd.DataFrame) -> list[bool]:
    """Per row of a pairs'-layout frame: True where the chosen or the rejected response is absent."""
    return [not (isinstance(c, str) and isinstance(r, str)) for c, r in zip(frame["chosen"], frame["rejected"])]


def kept_sides(pair_ids: Iterable[Any], seed: int) -> list[str]:
    """The side ``train.drop_one_side`` keeps of each pair: "chosen" or "rejected", about half each.

    A stable hash of (seed, pair id), not a draw from a stream: a pair keeps the same side for a seed
    whichever other pairs train with it (bucket filters) and in whatever order they are listed.
    """
    def side(pair_id: Any) -> str:
        bit = hashlib.sha256(f"drop_one_side:{int(seed)}:{pair_id}".encode()).digest()[0] & 1
        return "chosen" if bit else "rejected"
    return [side(pair_id) for pair_id in pair_ids]


def refusal(method: Any, why: str, instead: str) -> UserError:
    """The one line a method without ``accepts_unpaired: true`` gets for one-sided rows: the method, the
    flag, what made the rows one-sided (``why``) and the alternative to a method that accepts them."""
    name, loss = method.get("name", "?"), method.get("loss", "?")
    flag = str(bool(method.get("accepts_unpaired", False))).lower()
    return UserError(f"method.name={name} (loss {loss}) has accepts_unpaired: {flag} in its method file, but {why} "
                     f"gives rows with one side absent; use a method with accepts_unpaired: true (method=bnf) or {instead}")


def scored_text_hash(rows: pd.DataFrame) -> str:
    """What the reference model reads of the one-sided rows, in row order: row id (a hash of prompt,
    completion and label) and the rendered prompt (as ``reference.scored_text_hash`` for pairs)."""
    digest = hashlib.sha256(b"unpaired")
    for row_id, prompt in zip(rows["pair_id"].astype(str), rows["prompt"].astype(str)):
        digest.update(row_id.encode())
        digest.update(hashlib.sha256(prompt.encode()).digest())
    return digest.hexdigest()
