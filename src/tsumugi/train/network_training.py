"""``*_train_network``: LoRA training from cached latents and text embeddings."""

from __future__ import annotations

from pathlib import Path

import torch

from tsumugi.train.config import TrainConfig
from tsumugi.train.lora_metadata import lora_metadata
from tsumugi.train.run_setup import (
    COMPUTE_DTYPES,
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


def import_network_module(name: str):
    """``networks.lora_qwen_image`` (Musubi's spelling) or a full module path."""
    from tsumugi.networks.network_modules import import_network_module as resolve

    return resolve(name)


def train_network(arch_name: str, args: TrainConfig) -> TrainingResult:
    """Run LoRA training; returns the final LoRA file and the step losses."""
    from tsumugi.networks.lora_save import save_lora
    from tsumugi.train.lr_schedulers import create_lr_scheduler
    from tsumugi.train.optimizers import create_optimizer

    run = start_run(arch_name, args)
    claim_outputs(run, network=True)
    accelerator = run.accelerator
    dtype = COMPUTE_DTYPES[args.mixed_precision]
    prepare_sampler(run)  # text encoder used and freed, VAE checked, before the DiT loads
    dit, swapper = load_training_dit(run, dtype, trainable=False)
    module = import_network_module(args.network_module)
    torch.manual_seed(run.seed)  # the LoRA initialisation (Kaiming-uniform down weights)
    network = module.create_network(
        dit, args.network_dim, args.network_alpha, args.network_dropout, args.network_args,
        dim_from_weights=args.network_weights if args.dim_from_weights else None, device=accelerator.device,
    )
    network.apply_to()
    if args.network_weights and not args.dim_from_weights:
        network.load_weights(args.network_weights)
    network.to(accelerator.device)
    network.train()

    loraplus = None
    for item in args.network_args or []:
        if item.startswith("loraplus_lr_ratio="):
            loraplus = float(item.split("=", 1)[1])
    optimizer, info = create_optimizer(args, network.prepare_optimizer_params(args.learning_rate, loraplus))
    max_steps = max_train_steps(run)
    lr_scheduler = create_lr_scheduler(args, optimizer, max_steps, accelerator.num_processes, optimizer_info=info)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    save_dtype = SAVE_DTYPES[args.save_precision or "fp32"]

    def save_weights(path: Path, progress: TrainProgress) -> None:
        meta = lora_metadata(
            recorded_flags(run), arch_name, run.model_version, run.datasets, session_id=run.session_id,
            started_at=run.started, steps=progress.global_step, epoch=progress.epoch,
            num_batches_per_epoch=run.data.batches_per_epoch(), num_epochs=run.num_epochs,
            optimizer_name=info.metadata,
        )
        save_lora(network, path, args.lora_layout, meta, save_dtype)

    after_step = None
    if args.scale_weight_norms:
        def after_step() -> None:
            network.apply_max_norm(args.scale_weight_norms)

    return run_training(run, dit=dit, swapper=swapper, params=list(network.parameters()), optimizer=optimizer,
                        lr_scheduler=lr_scheduler, save_weights=save_weights, trainable=network,
                        state_module=network, tracker_name="network_train", after_step=after_step)

