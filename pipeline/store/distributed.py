"""Several processes of one launch (``accelerate launch``, torchrun): which process computes what.

A stage whose work every process shares builds its artifact with ``build_shared``: on one process it is
plain ``artifacts.build``; on several, the main process holds the artifact's lock and writes it, and every
process runs ``compute`` on the same partial directory in between (``artifacts.build_collective``), where
only the main one may write. What the processes share:

- training: every rank trains on its share of each step's pairs (DDP); the process count is in the key;
- reference scoring: rank r scores a contiguous ``shard`` of the rows; ``gather`` brings every rank's part
  to every rank in rank order, so the main one writes exactly the single-process artifact (same key);
- lm-eval: its own data-parallel path (requests split over ranks, results gathered to rank 0;
  pipeline/evaluation/lm_eval_parallel.py makes the prompts independent of the process count).

The process group is accelerate's ``PartialState``: created once per process (by the first stage that asks)
and kept for the rest of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pipeline.store.artifacts import Artifact, build, build_collective


def process_state():
    """accelerate's process state: joins the process group under a distributed launch, else one process."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def build_shared(root: Path | str, stage: str, config: dict[str, Any], upstream: dict[str, Artifact],
                 compute: Callable[[Path], dict[str, Any] | None], *, resumable: Sequence[str] | bool = False) -> Artifact:
    """``build`` whose ``compute`` runs on every process of a distributed launch (only the main one writes)."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    if state.num_processes == 1:
        return build(root, stage, config, upstream, compute, resumable=resumable)
    return build_collective(root, stage, config, upstream, compute, resumable=resumable,
                            is_main=state.is_main_process,
                            share=lambda value: broadcast_object_list([value], from_process=0)[0])


def shard(count: int, rank: int, processes: int) -> range:
    """Rank ``rank``'s contiguous share of ``count`` rows; the first ``count % processes`` ranks take one more,
    so concatenating the shards in rank order gives back ``range(count)``."""
    per, extra = divmod(count, processes)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def gather(value: Any) -> list[Any]:
    """Every process's ``value`` on every process, in rank order (a single process: ``[value]``)."""
    state = process_state()
    if state.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object
    return gather_object([value])
