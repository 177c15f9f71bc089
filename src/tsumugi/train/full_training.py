"""``*_train``: full fine-tuning of the DiT from cached latents and text embeddings.

Every DiT weight trains. Weights are float32 (autocast computes in ``--mixed_precision``), or bfloat16
with ``--full_bf16``. Checkpoints are ComfyUI-layout single files streamed to disk tensor by tensor,
so saving never holds a second copy of the model in memory (``--mem_eff_save`` is therefore always on).

Differences from Musubi Tuner's ``*_train`` (see also ``docs/full_finetuning.md``):

- ``--fused_backward_pass`` works with gradient accumulation: gradients accumulate as usual and each
  parameter steps inside the backward pass of the last micro-batch; the LR scheduler advances once per
  optimizer step, not per micro-batch.
- Block swap works with any optimizer on both families: before the step, gradients of offloaded weights
  move to where the weights are, and optimizer state follows its parameter
  (``--block_swap_optimizer_patch_params`` is accepted and always in effect).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tsumugi.counts import format_count
from tsumugi.train.config import TrainConfig
from tsumugi.train.lora_metadata import lora_metadata
from tsumugi.train.run_setup import (
    SAVE_DTYPES,
    TrainingResult,
    claim_outputs,
    load_training_dit,
    max_train_steps,
    prepare_sampler,
    recorded_flags,
    run_training,
    start_run,
)
from tsumugi.train.state import TrainProgress

logger = logging.getLogger(__name__)


def follow_parameter_devices(optimizer: torch.optim.Optimizer) -> None:
    """Put every gradient and optimizer-state tensor on its parameter's current device.

    Block swap re-points an offloaded weight's ``.data`` to its CPU master while the gradient computed
    during the backward stays on the GPU; the optimizer then steps the CPU master with a CPU gradient.
    A weight loaded at step time steps on the GPU (block swap writes it back when it is evicted).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.device != p.device:
                p.grad = p.grad.to(p.device)
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.device != p.device:
                    state[key] = value.to(p.device)


def train_full(arch_name: str, args: TrainConfig) -> TrainingResult:
    """Run full fine-tuning; returns the final DiT checkpoint and the step losses."""
    from tsumugi.models.dit_checkpoint import save_dit_checkpoint
    from tsumugi.train.lr_schedulers import create_lr_scheduler
    from tsumugi.train.optimizers import create_optimizer

    run = start_run(arch_name, args)
    claim_outputs(run, network=False)
    accelerator = run.accelerator
    weight_dtype = torch.bfloat16 if args.full_bf16 else torch.float32
    prepare_sampler(run)  # text encoder used and freed, VAE checked, before the DiT loads
    dit, swapper = load_training_dit(run, weight_dtype, trainable=True)
    params = [p for p in dit.parameters() if p.requires_grad]
    logger.info("training %d DiT tensors (%s parameters) in %s", len(params),
                format_count(sum(p.numel() for p in params)), str(weight_dtype).removeprefix("torch."))

    raw_optimizer, info = create_optimizer(args, [{"params": params, "lr": args.learning_rate}])
    max_steps = max_train_steps(run)
    lr_scheduler = create_lr_scheduler(args, raw_optimizer, max_steps, accelerator.num_processes,
                                       optimizer_info=info)
    optimizer, lr_scheduler = accelerator.prepare(raw_optimizer, lr_scheduler)

    fused = None
    if args.fused_backward_pass:
        from tsumugi.train.fused_adafactor import FusedBackwardStep

        reduce = None
        if accelerator.num_processes > 1:
            def reduce(grad: torch.Tensor) -> torch.Tensor:
                return accelerator.reduce(grad, reduction="mean")
        fused = FusedBackwardStep.attach(raw_optimizer, max_grad_norm=args.max_grad_norm or 0.0, reduce_grad=reduce,
                                  accumulation_steps=args.gradient_accumulation_steps)
    before_step = None
    if swapper is not None:
        def before_step() -> None:
            follow_parameter_devices(raw_optimizer)

    save_dtype = SAVE_DTYPES[args.save_precision] if args.save_precision else weight_dtype

    def save_weights(path: Path, progress: TrainProgress) -> None:
        meta = lora_metadata(
            recorded_flags(run), arch_name, run.model_version, run.datasets, session_id=run.session_id,
            started_at=run.started, steps=progress.global_step, epoch=progress.epoch,
            num_batches_per_epoch=run.data.batches_per_epoch(), num_epochs=run.num_epochs,
            optimizer_name=info.metadata, network=False,
        )
        save_dit_checkpoint(dit, path, dtype=save_dtype, metadata=meta)

    return run_training(run, dit=dit, swapper=swapper, params=params, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, save_weights=save_weights, trainable=None,
                        state_module=dit, tracker_name="fine-tuning", fused=fused,
                        before_step=before_step)

