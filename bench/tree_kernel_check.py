"""Exactness of the packed layout and of the tree attention kernel on this machine's device.

    .venv/bin/python bench/tree_kernel_check.py          # CUDA when there is one, else CPU

The tiny model, a few generated pairs, DPO and BNF: per-token log-probs, O_t, the loss and every gradient of
a micro-batch (1) one pair per forward with the dense mask (SDPA) against (2) several pairs per row with the
kernel ``auto`` picks (FlexAttention on CUDA, the dense mask on CPU). On CPU, where FlexAttention has no
backward, (3) the forced FlexAttention kernel is compared forward only. Exits 1 on a difference over 1e-4
(fp32; the tests hold 1e-5 on CPU, a GPU's kernels round differently).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.modeling.batching import encode_pair  # noqa: E402
from pipeline.training.losses import get_loss  # noqa: E402
from pipeline.modeling.scoring import ForwardSettings, score_encodings  # noqa: E402
from pipeline.modeling.tiny_model import build_tiny_model  # noqa: E402
from pipeline.training.training_loop import forward_micro_batch, forward_rows  # noqa: E402

PAIRS = [(f"Q: what is {i} times {i + 3}?\nA:", f" {i} x {i + 3} = {i * (i + 3)}, so {i * (i + 3)}.",
          f" {i} x {i + 3} = {i * (i + 3) + 1}, so {i * (i + 3) + 1}.") for i in range(6)]
TOLERANCE = 1e-4


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = OmegaConf.load(REPO / "conf" / "model" / "tiny.yaml")
    model, tokenizer = build_tiny_model(cfg.tiny)
    model = model.float().to(device)
    encodings = [encode_pair(tokenizer, p, c, r, 128, 64) for p, c, r in PAIRS]
    rows = list(range(len(encodings)))
    reference = score_encodings(copy.deepcopy(model), encodings, 0, rows, settings=ForwardSettings(attention="mask"),
                                progress=False)
    worst = 0.0
    for method in ("dpo", "bnf"):
        cfg_method = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "method" / f"{method}.yaml"), resolve=True)
        grads, losses = [], []
        for settings in (ForwardSettings("response", 8, attention="mask"), ForwardSettings("response", 8, pack_tokens=96)):
            policy = copy.deepcopy(model)
            result = forward_micro_batch(policy, encodings, 0, rows, reference, get_loss(cfg_method["loss"]), cfg_method,
                                         device, settings=settings)
            result.output.loss.backward()
            losses.append(result.output.loss.detach())
            grads.append({n: p.grad for n, p in policy.named_parameters()})
            kernel = getattr(policy.config, "_attn_implementation", None)
        difference = max([float((losses[0] - losses[1]).abs())] +
                         [float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0]])
        print(f"{method} on {device}: packed ({kernel}) vs one pair per forward (dense mask): loss and gradients "
              f"differ by at most {difference:.2e}", flush=True)
        worst = max(worst, difference)
    if device.type == "cpu":  # FlexAttention runs forward only here
        with torch.no_grad():
            dense = forward_rows(model, encodings, 0, device, True, ForwardSettings("response", 8, pack_tokens=96))
            flex = forward_rows(copy.deepcopy(model), encodings, 0, device, True,
                                ForwardSettings("response", 8, pack_tokens=96, attention="flex"))
        difference = max(float((a[side][i] - b[side][i]).abs().max()) for (a, _, _), (b, _, _) in zip(dense, flex)
                         for side in ("chosen", "rejected") for i in (0, 2))
        print(f"FlexAttention forward on cpu vs the dense mask: log-probs and O_t differ by at most {difference:.2e}")
        worst = max(worst, difference)
    print(f"tree kernel check: {'OK' if worst <= TOLERANCE else 'FAILED'} (worst {worst:.2e}, tolerance {TOLERANCE})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
