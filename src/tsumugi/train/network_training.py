"""``*_train_network``: LoRA training from cached latents and text embeddings."""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tsumugi.arch import get_architecture
from tsumugi.arch.base import Architecture
from tsumugi.caching.validate import check_caches
from tsumugi.cli.train_args import build_train_parser, parse_train_args, validate_train_args
from tsumugi.data.config import load_dataset_config
from tsumugi.errors import UserError
from tsumugi.train.cached_data import CachedTrainingData
from tsumugi.train.lora_metadata import lora_metadata
from tsumugi.train.state import TrainProgress, load_state, save_state
from tsumugi.train.trainer import TrainingLoop, resolve_seed, steps_per_epoch

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}


def import_network_module(name: str):
    """``networks.lora_qwen_image`` (Musubi's spelling) or a full module path."""
    candidates = [name] + ([f"tsumugi.{name}"] if name.startswith("networks.") else [])
    for candidate in candidates:
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError:
            continue
        if hasattr(module, "create_network"):
            return module
    known = "networks.lora_qwen_image, networks.lora_zimage"
    raise UserError(f"--network_module: {name!r} is not a network module (known: {known})")


class CheckpointHooks:
    """Saving, sampling and logging at step and epoch boundaries."""

    def __init__(self, *, arch, args, accelerator, network, dit, datasets, data, optimizer, optimizer_info,
                 model_version, max_steps, sampler, swapper, histograms) -> None:
        self.arch, self.args, self.acc, self.network, self.dit = arch, args, accelerator, network, dit
        self.datasets, self.data, self.optimizer_info, self.model_version = datasets, data, optimizer_info, model_version
        self.optimizer, self.max_steps = optimizer, max_steps
        self.sampler, self.swapper, self.histograms = sampler, swapper, histograms
        self.epoch_first_step = 0
        self.session_id = random.SystemRandom().randint(0, 2**31)
        self.started = time.time()
        self.output = Path(args.output_dir)
        self.last_sampled_step = -1
        self.losses: list[float] = []
        self.step_ends: list[float] = []

    # -- files
    def save_lora(self, name: str, progress: TrainProgress) -> Path | None:
        if not self.acc.is_main_process:
            return None
        from tsumugi.networks.lora_save import save_lora

        meta = lora_metadata(
            self.args, self.arch.name, self.model_version, self.datasets, session_id=self.session_id,
            started_at=self.started, steps=progress.global_step, epoch=progress.epoch,
            num_batches_per_epoch=self.data.batches_per_epoch(), optimizer_name=self.optimizer_info.metadata,
        )
        path = self.output / f"{name}.safetensors"
        save_lora(self.network, path, self.args.lora_layout, meta, _SAVE_DTYPES[self.args.save_precision])
        logger.info("saved %s", path)
        return path

    def _prune(self, pattern: str, keep_newer_than: int, number) -> None:
        if not self.acc.is_main_process:
            return
        for path in self.output.glob(pattern):
            value = number(path)
            if value is not None and value < keep_newer_than:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def save_state(self, name: str, progress: TrainProgress) -> None:
        save_state(self.acc, progress, self.output / name)

    def sample(self, label: str) -> None:
        if self.sampler is None or not self.acc.is_main_process:
            return
        self.network.eval()
        if self.swapper is not None:
            self.swapper.set_mode("forward")
        self.sampler.render(self.dit, label)
        if self.swapper is not None:
            self.swapper.set_mode("train")
        self.network.train()

    # -- events
    def on_step(self, progress: TrainProgress, loss: float, average: float, sigmas: torch.Tensor) -> None:
        args, step, name = self.args, progress.global_step, self.args.output_name
        self.losses.append(loss)
        self.step_ends.append(time.perf_counter())
        logs = {"loss/current": loss, "loss/average": average}
        for i, group in enumerate(self.optimizer.param_groups):
            logs["lr/" + group.get("name", f"group{i}")] = group["lr"]
        self.acc.log(logs, step=step)
        if self.histograms is not None:
            self.histograms.add_histogram("timesteps", sigmas * 1000, step)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < self.max_steps:
            self.save_lora(f"{name}-step{step:08d}", progress)
            if args.save_state:
                self.save_state(f"{name}-step{step:08d}-state", progress)
            self._prune_steps(step)
        if args.sample_every_n_steps and step % args.sample_every_n_steps == 0:
            self.sample(f"{step:06d}")
            self.last_sampled_step = step

    def _prune_steps(self, step: int) -> None:
        def number(path: Path) -> int | None:
            part = path.name.split("-step")[-1][:8]
            return int(part) if part.isdigit() else None

        if self.args.save_last_n_steps:
            self._prune(f"{self.args.output_name}-step*.safetensors", step - self.args.save_last_n_steps + 1, number)
        limit = self.args.save_last_n_steps_state or self.args.save_last_n_steps
        if limit:
            self._prune(f"{self.args.output_name}-step*-state", step - limit + 1, number)

    def on_epoch_end(self, progress: TrainProgress) -> None:
        args, epoch, name = self.args, progress.epoch, self.args.output_name
        epoch_losses = self.losses[self.epoch_first_step:] or [float("nan")]
        self.epoch_first_step = len(self.losses)
        self.acc.log({"loss/epoch": sum(epoch_losses) / len(epoch_losses)}, step=progress.global_step)
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and progress.global_step < self.max_steps:
            self.save_lora(f"{name}-{epoch:06d}", progress)
            if args.save_state:
                self.save_state(f"{name}-{epoch:06d}-state", progress)

            def number(path: Path) -> int | None:
                part = path.name[len(name) + 1 :][:6]
                return int(part) if part.isdigit() else None

            if args.save_last_n_epochs:
                self._prune(f"{name}-[0-9]*.safetensors", epoch - args.save_last_n_epochs + 1, number)
            limit = args.save_last_n_epochs_state or args.save_last_n_epochs
            if limit:
                self._prune(f"{name}-[0-9]*-state", epoch - limit + 1, number)
        if args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
            if self.last_sampled_step != progress.global_step:  # no duplicate when a step rule just sampled
                self.sample(f"e{epoch:06d}")

    def on_nan(self, progress: TrainProgress, value: float) -> None:
        name = f"{self.args.output_name}-nan-step{progress.global_step:08d}-state"
        self.save_state(name, progress)
        raise UserError(
            f"loss is {value} at step {progress.global_step + 1} (epoch {progress.epoch + 1}); the state before "
            f"this step is saved in {self.output / name} (lower --learning_rate or check the data, then --resume it)"
        )


# Flags parsed for command compatibility whose feature is not built yet: refused, never ignored.
_NOT_YET = {
    "num_timestep_buckets": "timestep buckets",
    "huggingface_repo_id": "Hugging Face upload", "resume_from_huggingface": "Hugging Face resume",
    "show_timesteps": "--show_timesteps plots", "use_32bit_attention": "32-bit attention",
}


def refuse_unsupported(args: argparse.Namespace) -> None:
    """Raise a :class:`UserError` naming every given flag whose feature tsumugi does not have yet."""
    given = [f"--{name} ({what})" for name, what in _NOT_YET.items() if getattr(args, name, None)]
    dynamo = str(getattr(args, "dynamo_backend", "NO") or "NO").upper()
    if dynamo != "NO":
        given.append("--dynamo_backend (accelerate dynamo)")
    if given:
        raise UserError("not supported by tsumugi yet: " + ", ".join(given) + "; remove them to train")
    if getattr(args, "cuda_allow_tf32", False):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if getattr(args, "cuda_cudnn_benchmark", False):
        torch.backends.cudnn.benchmark = True


def _load_models(arch: Architecture, args: argparse.Namespace, device: torch.device, model_version: str):
    """The frozen DiT: with block swap it is loaded on the CPU and only the resident part moves to ``device``."""
    dtype = _DTYPES[args.mixed_precision]
    swap = bool(args.blocks_to_swap)
    dit = arch.load_dit(args.dit, dtype=dtype, device="cpu" if swap else device, model_version=model_version)
    dit.requires_grad_(False)
    dit.eval()
    if args.base_weights:
        from tsumugi.networks.lora_merge import merge_lora_files

        merge_lora_files(dit, args.base_weights, args.base_weights_multiplier)
    if args.fp8_base:
        from tsumugi.memory.fp8_dit import quantize_dit_fp8

        quantize_dit_fp8(dit, arch.name, scaled=args.fp8_scaled)
    if args.gradient_checkpointing and getattr(args, "gradient_checkpointing_cpu_offload", False):
        from tsumugi.memory.activation_offload import enable_checkpointing_with_cpu_offload

        enable_checkpointing_with_cpu_offload(dit, pin_memory=device.type == "cuda")
    elif args.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    from tsumugi.memory.attention import apply_attention_mode

    apply_attention_mode(dit, args.attn_mode, flag="--" + {"torch": "sdpa"}.get(args.attn_mode, args.attn_mode))
    if getattr(args, "split_attn", False):
        from tsumugi.memory.split_attention import apply_split_attention

        apply_split_attention(dit)
    if getattr(args, "compile", False):
        from tsumugi.memory.compile_blocks import compile_blocks

        # only block forwards are compiled: block swap's hooks stay eager; with swap the Linears run eagerly
        compile_blocks(dit, arch.name, backend=args.compile_backend, mode=args.compile_mode,
                       dynamic=args.compile_dynamic, fullgraph=args.compile_fullgraph,
                       cache_size_limit=args.compile_cache_size_limit, eager_linears=swap)
    swapper = None
    if swap:
        from tsumugi.memory.block_swap import attach_block_swap

        swapper = attach_block_swap(dit, args.blocks_to_swap, device, arch.name, mode="train",
                                    pinned=args.use_pinned_memory_for_block_swap, h2d_only=args.block_swap_h2d_only)
    return dit, dtype, swapper


@dataclass
class TrainingResult:
    lora_path: Path
    losses: list[float]
    """loss of each optimizer step run by this invocation (after a resume: the steps after it)"""
    global_step: int
    step_seconds: list[float]
    """wall time of each step after the first (for benchmarks)"""


def train_network(arch_name: str, args: argparse.Namespace) -> TrainingResult:
    """Run LoRA training; returns the final LoRA file and the step losses."""
    from accelerate import Accelerator

    from tsumugi.train.lr_schedulers import create_lr_scheduler
    from tsumugi.train.optimizers import create_optimizer

    arch = get_architecture(arch_name)
    refuse_unsupported(args)
    model_version = getattr(args, "model_version", None) or "original"
    if model_version == "layered":
        raise UserError("--model_version layered: Qwen-Image-Layered training is not supported yet")
    arch_code = arch.cache_arch_code(model_version)
    datasets = load_dataset_config(args.dataset_config, args, architecture=arch_code)
    cached = check_caches(datasets, arch_code, model_version, arch.name)
    data = CachedTrainingData(datasets, cached, arch.text_cache_name)
    seed = resolve_seed(args)

    log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
    if log_with in ("wandb", "all"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError(f"--log_with {log_with} needs the Python package 'wandb': pip install wandb")
    logging_dir = None
    if args.logging_dir:
        logging_dir = Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=log_with,
                              project_dir=str(logging_dir) if logging_dir else None)
    dit, dtype, swapper = _load_models(arch, args, accelerator.device, model_version)
    module = import_network_module(args.network_module)
    torch.manual_seed(seed)  # the LoRA initialisation (Kaiming-uniform down weights)
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
    per_epoch = steps_per_epoch(data, accelerator.num_processes, args.gradient_accumulation_steps)
    if args.max_train_epochs:
        args.max_train_steps = args.max_train_epochs * per_epoch
    max_steps = args.max_train_steps
    lr_scheduler = create_lr_scheduler(args, optimizer, max_steps, accelerator.num_processes, optimizer_info=info)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(network)

    progress = TrainProgress(seed=seed)
    if args.resume:
        progress = load_state(accelerator, args.resume)
        if progress.seed != seed and args.seed is not None:
            logger.warning("--seed %d differs from the resumed run's %d: the resumed run's seed is used", seed,
                           progress.seed)
        logger.info("resumed at step %d (epoch %d, batch %d)", progress.global_step, progress.epoch + 1,
                    progress.batch_index)

    if log_with:
        accelerator.init_trackers(args.log_tracker_name or "network_train", config=None)
    sampler = None
    if args.sample_prompts:
        from tsumugi.train.sample_prompts import TrainingSampler

        sampler = TrainingSampler(arch, args, accelerator.device, dtype, accelerator.is_main_process)
    hooks = CheckpointHooks(arch=arch, args=args, accelerator=accelerator, network=network, dit=dit,
                            datasets=datasets, data=data, optimizer=optimizer, optimizer_info=info,
                            model_version=model_version, max_steps=max_steps, sampler=sampler, swapper=swapper,
                            histograms=_histogram_writer(accelerator) if log_with else None)
    loop = TrainingLoop(arch=arch, dit=dit, network=network, data=data, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, accelerator=accelerator, args=args, progress=progress,
                        max_steps=max_steps, hooks=hooks)
    if args.sample_at_first and progress.global_step == 0:
        hooks.sample("000000")
    loop.run()

    final = hooks.save_lora(args.output_name, progress)
    if args.save_state_on_train_end or args.save_state:
        hooks.save_state(f"{args.output_name}-state", progress)
    accelerator.end_training()
    path = final or Path(args.output_dir) / f"{args.output_name}.safetensors"
    ends = hooks.step_ends
    return TrainingResult(path, hooks.losses, progress.global_step, [b - a for a, b in zip(ends, ends[1:])])


def _histogram_writer(accelerator):
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            return tracker.writer
    return None


def train_network_main(arch_name: str, argv: list[str] | None = None) -> int:
    parser = build_train_parser(arch_name, network=True)
    args = validate_train_args(parse_train_args(parser, argv))
    train_network(arch_name, args)
    return 0
