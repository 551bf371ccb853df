"""fp32 vs bf16 autocast for one SmolLM2-135M training forward + backward on this machine's CPU.

`python bench/precision.py`: 8 rows x 200 tokens, weights fp32, forward (+ log-softmax) and backward
timed once each way. On CPUs without native bf16 (no AVX512-BF16 / AMX) autocast emulates bf16 and is
far slower than fp32: why `train.precision=auto` picks fp32 there. Prints the CPU's bf16 capability.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.environment import apply_offline_defaults  # noqa: E402

apply_offline_defaults(REPO / ".cache")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.modeling import models  # noqa: E402
from pipeline.modeling.precision import cpu_has_native_bf16  # noqa: E402


def main() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "model" / "smollm2_135m.yaml")
    store = Path(os.environ.get("PREFOPT_BENCH_STORE", Path(tempfile.gettempdir()) / "prefopt-bench-store"))
    artifact = models.run(OmegaConf.create({"model": cfg}), {}, store)
    model = models.load_causal_lm(artifact, cfg, trainable=True)
    ids = torch.randint(0, 1000, (8, 200), generator=torch.Generator().manual_seed(0))
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()}")
    for precision in ("fp32", "bf16"):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        started = time.time()
        with context:
            logits = model(input_ids=ids).logits
        forward = time.time() - started
        logits.float().log_softmax(-1).mean().backward()
        backward = time.time() - started - forward
        model.zero_grad(set_to_none=True)
        print(f"{precision}: forward {forward:.2f} s, backward {backward:.2f} s, total {forward + backward:.2f} s")


if __name__ == "__main__":
    main()
