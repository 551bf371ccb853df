"""Which forward precision a run uses: ``train.precision`` = fp32 | bf16 | auto.

``auto`` (the default) is bf16 autocast where the hardware computes bf16 natively (a CUDA GPU with
bf16 support, or a CPU with AVX512-BF16 / AMX-BF16) and fp32 elsewhere. On a CPU without native
bf16 (AVX2 only), autocast emulates it and is far slower than fp32: measured on a 2-core AMD EPYC
(AVX2), SmolLM2-135M forward + backward of 8 x 200 tokens took 14 s in fp32 and 226 s under bf16
autocast (BENCHMARKS.md). The RESOLVED precision enters every artifact key that depends on it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "auto")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: be conservative
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def native_bf16() -> bool:
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def resolve_precision(value: str) -> str:
    """"fp32" or "bf16" for a ``train.precision`` setting."""
    value = str(value)
    if value == "auto":
        return "bf16" if native_bf16() else "fp32"
    if value not in PRECISIONS:
        from pipeline.errors import UserError
        raise UserError(f"train.precision={value!r}: expected one of {list(PRECISIONS)}")
    return value
