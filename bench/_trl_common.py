"""TRL DPOTrainer setup shared by the benchmarks (train_vs_trl.py, sweep_cost.py).

One place for the settings that make a TRL run comparable to ours: AdamW, linear decay, no warm-up,
clipping 1.0, fp32 on CPU, no logging or checkpoints, one process, gradient checkpointing OFF (TRL 1.16's
DPOConfig turns it on by default; our SmolLM2 and tiny presets train without it, and recomputing the
activations would cost TRL a second forward through every layer). Needs the bench extra (trl).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrlResult:
    seconds: float          # wall time of the timed part (see run_trl)
    reference_rows: int     # sequences that went through the separate reference model's forward
    policy_tokens: int = 0  # positions (padding included) through the policy's forwards during train()
    reference_tokens: int = 0  # positions through the reference model's forwards (precomputation included)
    gradient_checkpointing: bool = False  # what TRL's policy model really ran with


def quiet() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def dpo_config(out: Path, *, batch: int, max_length: int, beta: float, loss_type: str, lr: float = 5e-6,
               precompute: bool = False, max_steps: int | None = None, bf16: bool = False,
               gradient_checkpointing: bool = False, warmup: float = 0):
    """DPOConfig matching our trainer's defaults in the benchmarks; ``max_steps=None`` means one epoch.

    ``gradient_checkpointing`` must equal the model preset's ``model.gradient_checkpointing`` (false for
    smollm2_135m and tiny) so both sides do the same work; ``warmup`` is TRL's ``warmup_steps`` (a float
    below 1 is a ratio, the same as our ``train.warmup_ratio``)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, num_train_epochs=1,
        max_steps=-1 if max_steps is None else max_steps, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=warmup, max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0,
        beta=beta, loss_type=[loss_type], max_length=max_length, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=batch, logging_steps=10**9, save_strategy="no", report_to=[], use_cpu=not _cuda(),
        bf16=bf16, seed=0, disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=gradient_checkpointing)


def run_trl(model_dir: Path, pairs, config, out: Path, time_construction: bool = True) -> TrlResult:
    """Load the model, build the DPOTrainer, ``train()`` and ``save_model``; time it all.

    ``time_construction=False`` restarts the clock after construction (tokenising and any
    reference precomputation are then not timed). The reference rows are counted by a forward
    hook on TRL's own reference model, so the number is what TRL did, not what we expect it to do.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOTrainer

    dataset = Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True))
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict would flood the benchmark output
    counts = {"rows": 0, "reference": 0, "policy": 0}

    def counter(key):
        def count(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                counts[key] += int(ids.numel())
                if key == "reference":
                    counts["rows"] += int(ids.shape[0])
        return count

    handles = [trainer.model.register_forward_pre_hook(counter("policy"), with_kwargs=True)]
    if trainer.ref_model is not None:
        handles.append(trainer.ref_model.register_forward_pre_hook(counter("reference"), with_kwargs=True))
    if not time_construction:
        started = time.perf_counter()
    trainer.train()
    trainer.save_model(str(out / "final"))
    seconds = time.perf_counter() - started
    # train() switches it on (TRL 1.16's default): check what really ran, not what was asked for.
    checkpointing = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    if checkpointing != bool(config.gradient_checkpointing):
        raise RuntimeError(f"TRL trained with gradient checkpointing {checkpointing}, the config asked for "
                           f"{config.gradient_checkpointing}: the comparison would not be on equal terms")
    for handle in handles:
        handle.remove()
    return TrlResult(seconds, counts["rows"], counts["policy"], counts["reference"], checkpointing)


def _cuda() -> bool:
    """TRL on the GPU when there is one (bench/gpu_check.sh), as our train stage."""
    import torch
    return torch.cuda.is_available()
