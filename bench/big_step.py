"""One training step of a random-init 7B-shape Llama: FSDP2, gradient checkpointing, pairs packed per row.

    .venv/bin/python bench/big_step.py             # on one GPU: 7B shape (Llama-2-7B sizes), bf16 weights
    .venv/bin/python bench/big_step.py --cpu       # the same path at a small shape on CPU (gloo), a few seconds

A shape and memory check, not a training run: the weights are random (initialised on the device, no file),
in bf16 with bf16 AdamW states (fp32 master weights of 7B parameters and their AdamW moments, 112 GB, do
not fit one 80 GB card unsharded). Each decoder layer and the root are wrapped by FSDP2's ``fully_shard``
(one rank: the wrapping, gathering and hooks run, nothing is split), activation checkpointing is on, and
the micro-batch goes through the trainer's own ``forward_micro_batch`` with ``pack_tokens`` rows (on CUDA
the tree layouts use FlexAttention). The reference log-probs are the same model's, scored first (the
reference on the fly). Printed: step seconds, peak memory, the loss (DPO at step 0: log 2 up to rounding).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, vocab
    "7b": (4096, 11008, 32, 32, 32000),
    "small": (64, 192, 2, 4, 1000),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="small shape on CPU (gloo)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per pair")
    parser.add_argument("--response", type=int, default=256, help="response tokens per side")
    parser.add_argument("--pack-tokens", type=int, default=4096)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    hidden, intermediate, layers, heads, vocab = SHAPES["small" if args.cpu else "7b"]

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    from omegaconf import OmegaConf
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.modeling.batching import PairEncoding
    from pipeline.training.losses import get_loss
    from pipeline.modeling.models import keep_output_head_fp32
    from pipeline.modeling.scoring import ForwardSettings, score_encodings
    from pipeline.training.training_loop import forward_micro_batch

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built on the device in bf16 (transformers' own init), no file
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    keep_output_head_fp32(model)  # as every model the pipeline loads: the head in fp32 (pipeline/modeling/models.py)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    print(f"{'7B' if not args.cpu else 'small'} shape: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters on {device}, built in {time.perf_counter() - started:.1f} s", flush=True)

    rng = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(4, vocab, (n,), generator=rng).tolist()

    encodings = []
    for _ in range(args.pairs):
        prompt = tokens(args.prompt)
        encodings.append(PairEncoding(prompt + tokens(args.response), prompt + tokens(args.response),
                                      len(prompt), len(prompt)))
    settings = ForwardSettings("response", 1024, "fp32", args.pack_tokens)
    reference = score_encodings(model, encodings, 0, list(range(len(encodings))), with_logits=False,
                                settings=settings, progress=False)
    method = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "method" /
                                                   "dpo.yaml"), resolve=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model.train()
    result = forward_micro_batch(model, encodings, 0, list(range(len(encodings))), reference,
                                 get_loss(method["loss"]), method, device, settings=settings)
    result.output.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    loss = float(result.output.loss.detach())
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a (CPU)"
    print(f"one step, {args.pairs} pairs x ({args.prompt} prompt + 2 x {args.response} response) tokens, "
          f"pack_tokens={args.pack_tokens}: {seconds:.1f} s, peak memory {peak}, loss {loss:.6f} "
          f"(log 2 = {math.log(2):.6f})", flush=True)
    torch.distributed.destroy_process_group()
    if not math.isfinite(loss) or abs(loss - math.log(2)) > 1e-2:
        raise SystemExit(f"step 0 loss {loss} is not log 2: the packed forward does not reproduce the reference")


if __name__ == "__main__":
    main()
