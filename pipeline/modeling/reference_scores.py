"""The reference stage's scores, read back: rows in the pair artifact's order, one-sided rows after them."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data import unpaired
from pipeline.modeling.scoring import ScoredPairs, concat_scored
from pipeline.store.artifact_reads import read_artifact_file
from pipeline.store.artifacts import Artifact

SCORES_FILE = "reference.safetensors"
UNPAIRED_SCORES_FILE = "unpaired.safetensors"  # one-sided rows, where the pair artifact has them


PAIRS_FILE = "pairs.parquet"  # written by the pair stage


def load_reference(artifact: Artifact) -> ScoredPairs:
    """The reference scores of a reference artifact (rows in pairs.parquet order, ids in ``.pair_ids``)."""
    return read_artifact_file(Path(artifact.path) / SCORES_FILE, ScoredPairs.load)


def load_scored_rows(pair: Artifact, reference: Artifact) -> tuple[pd.DataFrame, ScoredPairs]:
    """Every row the reference scored and its scores, in one order: pairs.parquet's pairs, then the
    one-sided rows of unpaired.parquet (pairs' layout, absent side None: ``unpaired.load_rows``)."""
    frame = read_artifact_file(Path(pair.path) / PAIRS_FILE, pd.read_parquet)
    scored = load_reference(reference)
    if [str(v) for v in scored.pair_ids] != frame["pair_id"].astype(str).tolist():
        raise RuntimeError(f"{reference.path}: reference rows do not follow pairs.parquet's row order")
    one_sided = unpaired.load_rows(pair.path)
    if one_sided is None:
        return frame, scored
    lone = read_artifact_file(Path(reference.path) / UNPAIRED_SCORES_FILE, ScoredPairs.load)
    if [str(v) for v in lone.pair_ids] != one_sided["pair_id"].tolist():
        raise RuntimeError(f"{reference.path}: one-sided reference rows do not follow unpaired.parquet's row order")
    frame = pd.concat([frame, one_sided], ignore_index=True) if len(frame) else one_sided.reset_index(drop=True)
    return frame, concat_scored([scored, lone])
