"""lm-eval's data-parallel path on the pipeline's own process group, with prompts that do not depend on it.

Two things lm-eval's HFLM does not do for a model it did not load itself:

- ``LmEvalCollectives``: what HFLM needs of ``self.accelerator`` for its data-parallel path (gather a
  tensor, wait for every rank, unwrap the model), on the process group the pipeline already joined.
  lm-eval builds its own ``Accelerator`` only when it loads the model; ours is loaded once by the
  pipeline's loader, as in every other stage.
- ``rank_independent_requests``: lm-eval builds each rank's requests from that rank's documents with one
  few-shot generator per task, drawn document after document, so under data parallelism document k gets
  other shots than in a single process and the scores change with the process count (lm-eval issue
  EleutherAI/lm-evaluation-harness#1308, open; its task.py has a TODO at that line). Here every rank
  builds ALL requests as one process would and keeps its own documents (``doc_id % world_size == rank``:
  lm-eval's own split, which its result processing iterates again), so every prompt is the single-process
  one. tests/test_multiprocess.py checks two processes against one, item by item.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.store.distributed import process_state


class LmEvalCollectives:
    """The part of accelerate's ``Accelerator`` that lm-eval's HFLM calls under data parallelism."""

    def __init__(self):
        self.state = process_state()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        from accelerate.utils import gather as gather_tensors
        return gather_tensors(tensor)

    def wait_for_everyone(self) -> None:
        self.state.wait_for_everyone()

    @staticmethod
    def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
        return model

    @property
    def is_local_main_process(self) -> bool:
        return self.state.is_local_main_process


def data_parallel(lm) -> None:
    """Make an HFLM wrapping a pre-loaded model take its share of the requests (no-op in one process)."""
    collectives = LmEvalCollectives()
    if collectives.state.num_processes > 1:
        lm.accelerator = collectives
        lm._rank, lm._world_size = collectives.state.process_index, collectives.state.num_processes


@contextmanager
def rank_independent_requests():
    """While lm-eval evaluates: each task builds every document's request as in one process, then keeps
    this rank's documents. Restored afterwards (the patch lives only for the call)."""
    from lm_eval.api.task import Task

    original = Task.build_all_requests

    def build_all_requests(self, *, rank: int = 0, world_size: int = 1, **kwargs):
        original(self, rank=0, world_size=1, **kwargs)
        if world_size > 1:
            self._instances = [item for item in self._instances if item.doc_id % world_size == rank]

    Task.build_all_requests = build_all_requests
    try:
        yield
    finally:
        Task.build_all_requests = original
