"""What LoRA training and full fine-tuning set up the same way.

Each training script supplies only what differs: which tensors train, how they are saved, what the
optimizer sees. Everything else (data and cache checks, accelerate, the DiT's memory options, the
optimizer and scheduler, resume, trackers, sampling, the loop and the final save) is done here once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from tsumugi.arch import get_architecture
from tsumugi.arch.base import Architecture
from tsumugi.caching.validate import check_caches_once
from tsumugi.data.config import DatasetConfig, load_dataset_config
from tsumugi.errors import RunInterrupted, UserError
from tsumugi.preflight.runs import check_training
from tsumugi.train.accelerator_options import (
    effective_log_with,
    kwargs_handlers,
    prepare_wandb,
    tracker_config,
    tracker_init_kwargs,
)
from tsumugi.train.cached_data import CachedTrainingData
from tsumugi.train.checkpoint_hooks import CheckpointHooks
from tsumugi.train.config import TrainConfig
from tsumugi.train.interrupts import StopRequest
from tsumugi.train.optimizers import optimizer_train
from tsumugi.train.output_lock import OutputLock
from tsumugi.train.resume_rules import check_resume, run_identity
from tsumugi.train.state import TrainingState, TrainProgress, find_resume_folder
from tsumugi.train.trainer import TrainingLoop, resolve_seed, steps_per_epoch

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Flags parsed for command compatibility whose feature is not built yet: refused, never ignored
# (--help says so too, see tsumugi.cli.flag_notes).
REFUSED_FLAGS = {
    "num_timestep_buckets": "timestep buckets",
    "huggingface_repo_id": "Hugging Face upload", "resume_from_huggingface": "Hugging Face resume",
    "huggingface_repo_type": "Hugging Face upload", "huggingface_path_in_repo": "Hugging Face upload",
    "huggingface_token": "Hugging Face upload", "huggingface_repo_visibility": "Hugging Face upload",
    "save_state_to_huggingface": "Hugging Face upload", "async_upload": "Hugging Face upload",
    "show_timesteps": "--show_timesteps plots", "use_32bit_attention": "32-bit attention",
    "dynamo_backend": "accelerate dynamo", "dynamo_mode": "accelerate dynamo",
    "dynamo_fullgraph": "accelerate dynamo", "dynamo_dynamic": "accelerate dynamo",
}


def refuse_unsupported(args: TrainConfig) -> None:
    """Raise a :class:`UserError` naming every given flag whose feature tsumugi does not have yet."""
    given = [f"--{name} ({what})" for name, what in REFUSED_FLAGS.items()
             if getattr(args, name, None) and (name != "dynamo_backend" or str(args.dynamo_backend).upper() != "NO")]
    if given:
        raise UserError("not supported by tsumugi yet: " + ", ".join(given) + "; remove them to train")
    if args.cuda_allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cuda_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


@dataclass
class TrainingRun:
    """The parts of one training invocation that do not depend on what is trained."""

    arch: Architecture
    args: TrainConfig
    model_version: str
    datasets: list[DatasetConfig]
    data: CachedTrainingData
    seed: int
    accelerator: object
    log_with: str | None
    num_epochs: int | None = None
    """epochs the run covers (the last may be partial); set by :func:`max_train_steps`"""
    max_train_steps: int | None = None
    """optimizer steps of the run (``--max_train_steps`` or from ``--max_train_epochs``); set by
    :func:`max_train_steps`"""
    sampler: object = None
    """the :class:`~tsumugi.train.sample_prompts.TrainingSampler` from :func:`prepare_sampler`, or ``None``"""
    session_id: int = field(default_factory=lambda: random.SystemRandom().randint(0, 2**31))
    started: float = field(default_factory=time.time)
    identity: dict = field(default_factory=dict)
    """what defines the run (stored in states, checked on resume)"""
    resume_state: dict | None = None
    """the checked state file of ``--resume``"""
    lock: OutputLock | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class TrainingResult:
    path: Path
    """the final weights file (LoRA or DiT checkpoint)"""
    losses: list[float]
    """loss of each optimizer step run by this invocation (after a resume: the steps after it)"""
    global_step: int
    step_seconds: list[float]
    """wall time of each step after the first (for benchmarks)"""


def start_run(arch_name: str, args: TrainConfig) -> TrainingRun:
    """Check flags, datasets and caches, then create the accelerator (nothing heavy is loaded yet)."""
    from accelerate import Accelerator

    arch = get_architecture(arch_name)
    refuse_unsupported(args)
    check_training(arch.name, args)  # every file and folder the run touches, before anything loads
    model_version = args.model_version or "original"
    if model_version == "layered":
        raise UserError("--model_version layered: Qwen-Image-Layered training is not supported yet")
    arch_code = arch.cache_arch_code(model_version)
    # images are not decoded here (caching did): the cache check notices any change to them
    datasets = load_dataset_config(args.dataset_config, args, architecture=arch_code, verify_images=False)
    cached = check_caches_once(datasets, arch_code, model_version, arch.name)
    data = CachedTrainingData(datasets, cached, arch.text_cache_name)
    if arch_code == "qie":
        without, total = data.items_without_controls()
        if without:
            logger.info("%d of %d item(s) have no control image and train as text-to-image items (no control "
                        "tokens in the DiT input)", without, total)
    seed = resolve_seed(args)

    log_with = effective_log_with(args)
    if log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise UserError(f"--log_with {log_with} needs the Python package 'wandb': pip install wandb")
    logging_dir = None
    if args.logging_dir:
        logging_dir = Path(args.logging_dir) / f"{args.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}"
    if log_with in ("wandb", "all"):
        prepare_wandb(args, logging_dir)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=log_with,
                              project_dir=str(logging_dir) if logging_dir else None,
                              kwargs_handlers=kwargs_handlers(args))
    return TrainingRun(arch, args, model_version, datasets, data, seed, accelerator, log_with)


def prepare_sampler(run: TrainingRun) -> None:
    """Encode the sample prompts and load the sample VAE (CPU) into ``run.sampler``; call before the DiT loads.

    The text encoder is freed before the DiT arrives, so the two never share the device. Without a
    sampling trigger nothing is loaded and ``--sample_prompts`` is reported as unused.
    """
    args = run.args
    if not args.sample_prompts:
        return
    if not (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first):
        logger.warning("--sample_prompts has no effect without --sample_every_n_steps, --sample_every_n_epochs "
                       "or --sample_at_first")
        return
    from tsumugi.train.sample_prompts import TrainingSampler

    run.sampler = TrainingSampler(run.arch, args, run.device, is_main=run.accelerator.is_main_process)


def load_training_dit(run: TrainingRun, dtype: torch.dtype, *, trainable: bool):
    """The DiT with the memory options applied; returns ``(dit, swapper)``.

    The DiT streams in tensor by tensor: LoRA files given as ``--base_weights`` are merged into each
    weight and ``--fp8_base`` quantizes it as it arrives; with block swap the swapped weights go straight
    to their (pinned) host home and everything else to the device.
    """
    arch, args, device = run.arch, run.args, run.device
    swap = bool(args.blocks_to_swap)
    steps = []
    if args.base_weights:
        from tsumugi.networks.lora_merge import LoraMergeStep

        steps.append(LoraMergeStep(args.base_weights, args.base_weights_multiplier, flag="--base_weights",
                                   multiplier_flag="--base_weights_multiplier"))
    if args.fp8_base:
        from tsumugi.memory.fp8_dit import Fp8DitStep

        steps.append(Fp8DitStep(arch.name, scaled=args.fp8_scaled))
    stream = {}
    if swap:
        from tsumugi.memory.block_swap import swap_host_tensors

        stream = {"host_tensors": swap_host_tensors(args.blocks_to_swap, arch.name),
                  "pin_host": bool(args.use_pinned_memory_for_block_swap) and device.type == "cuda"}
    dit = arch.load_dit(args.dit, dtype=dtype, device=device, model_version=run.model_version, steps=steps,
                        **stream)
    dit.requires_grad_(trainable)
    dit.train(trainable)
    if args.fp8_base:
        for module in dit.modules():  # fp8 layers stay frozen (LoRA training only)
            if hasattr(module, "scale_weight"):
                module.requires_grad_(False)
    if args.gradient_checkpointing and args.gradient_checkpointing_cpu_offload:
        from tsumugi.memory.activation_offload import enable_checkpointing_with_cpu_offload

        enable_checkpointing_with_cpu_offload(dit, pin_memory=device.type == "cuda")
    elif args.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    from tsumugi.memory.attention import apply_attention_mode

    apply_attention_mode(dit, args.attn_mode, flag="--" + {"torch": "sdpa"}.get(args.attn_mode, args.attn_mode))
    if args.split_attn:
        from tsumugi.memory.split_attention import apply_split_attention

        apply_split_attention(dit)
    if args.compile:
        from tsumugi.memory.compile_blocks import compile_blocks

        # only block forwards are compiled: block swap's hooks stay eager; with swap the Linears run eagerly
        compile_blocks(dit, arch.name, backend=args.compile_backend, mode=args.compile_mode,
                       dynamic=args.compile_dynamic, fullgraph=args.compile_fullgraph,
                       cache_size_limit=args.compile_cache_size_limit, eager_linears=swap)
    swapper = None
    if swap:
        from tsumugi.memory.block_swap import attach_block_swap

        swapper = attach_block_swap(dit, args.blocks_to_swap, device, arch.name, mode="train",
                                    pinned=args.use_pinned_memory_for_block_swap,
                                    h2d_only=args.block_swap_h2d_only,
                                    slots=args.block_swap_ring_size)
    return dit, swapper


def max_train_steps(run: TrainingRun) -> int:
    """``--max_train_steps``, or ``--max_train_epochs`` converted to steps; sets ``run.max_train_steps``
    and ``run.num_epochs``."""
    args = run.args
    per_epoch = steps_per_epoch(run.data, run.accelerator.num_processes, args.gradient_accumulation_steps)
    steps = args.max_train_epochs * per_epoch if args.max_train_epochs else args.max_train_steps
    run.max_train_steps = steps
    run.num_epochs = math.ceil(steps / per_epoch)
    return steps


def recorded_flags(run: TrainingRun) -> TrainConfig:
    """The configuration as states and trackers record it: with the run's seed (drawn when ``--seed`` is
    omitted) and its step count (from ``--max_train_epochs`` when given)."""
    return dataclasses.replace(run.args, seed=run.seed, max_train_steps=run.max_train_steps)


def claim_outputs(run: TrainingRun, *, network: bool) -> None:
    """Lock ``--output_dir``/``--output_name``, then check ``--resume`` (before any model loads)."""
    if run.accelerator.is_main_process:
        run.lock = OutputLock.acquire(run.args.output_dir, run.args.output_name)
    try:
        check_resume_folder(run, network=network)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise


def check_resume_folder(run: TrainingRun, *, network: bool) -> None:
    """Record what defines the run; check ``--resume`` against it before any model loads."""
    run.identity = run_identity(run.arch.name, run.model_version, run.args, run.datasets,
                                run.accelerator.num_processes, network=network)
    if run.args.resume:
        if run.accelerator.is_main_process:
            find_resume_folder(run.args.resume)  # finishes an interrupted save of it
        run.accelerator.wait_for_everyone()
        run.resume_state = check_resume(run.args.resume, run.identity)


def resume_progress(run: TrainingRun, state: TrainingState) -> TrainProgress:
    """A fresh start, or the position saved in ``--resume`` (its objects restored into ``state``'s)."""
    args = run.args
    if not args.resume:
        return TrainProgress(seed=run.seed)
    if run.resume_state is None:
        check_resume_folder(run, network=run.identity.get("training") == "LoRA")
    progress = state.load(Path(args.resume), run.resume_state)
    if progress.seed != run.seed and args.seed is not None:
        logger.warning("--seed %d differs from the resumed run's %d: the resumed run's seed is used", run.seed,
                       progress.seed)
    logger.info("resumed at step %d (epoch %d, batch %d)", progress.global_step, progress.epoch + 1,
                progress.batch_index)
    return progress


def _save_interrupted(run: TrainingRun, hooks: CheckpointHooks, progress: TrainProgress, stop: StopRequest):
    """Save the weights and the state of an interrupted run, then raise :class:`RunInterrupted`."""
    name = f"{run.args.output_name}-interrupted"
    path = hooks.save(name, progress)
    hooks.save_state(f"{name}-state", progress)
    run.accelerator.end_training()
    state_dir = Path(run.args.output_dir) / f"{name}-state"
    raise RunInterrupted(
        f"{stop.name} after step {progress.global_step}: saved the weights to {path or 'the main process'} and "
        f"the state to {state_dir}; to continue, run the same command with --resume {state_dir}", stop.exit_code
    )


def _histogram_writer(accelerator):
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            return tracker.writer
    return None


def run_training(
    run: TrainingRun,
    *,
    dit: torch.nn.Module,
    swapper,
    params: list[torch.Tensor],
    optimizer,
    lr_scheduler,
    save_weights: Callable[[Path, TrainProgress], None],
    trainable: torch.nn.Module | None,
    tracker_name: str,
    state_module: torch.nn.Module,
    fused=None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> TrainingResult:
    """Resume, then run the loop with saving/sampling hooks, then write the final weights and state.

    ``optimizer`` and ``lr_scheduler`` must already be prepared by the accelerator; ``state_module`` is
    the module whose weights a state folder holds (the LoRA network or the DiT).
    """
    try:
        return _run_training(run, dit=dit, swapper=swapper, params=params, optimizer=optimizer,
                             lr_scheduler=lr_scheduler, save_weights=save_weights, trainable=trainable,
                             tracker_name=tracker_name, state_module=state_module, fused=fused,
                             before_step=before_step, after_step=after_step)
    finally:
        if run.lock is not None:
            run.lock.release()
        # a process group left to the interpreter's exit can abort in its threads' destructors
        # ("terminate called without an active exception"): close it while the run still owns it
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_training(run: TrainingRun, *, dit, swapper, params, optimizer, lr_scheduler, save_weights, trainable,
                  tracker_name, state_module, fused, before_step, after_step) -> TrainingResult:
    args, accelerator = run.args, run.accelerator
    max_steps = run.max_train_steps if run.max_train_steps is not None else max_train_steps(run)
    recorded = recorded_flags(run)
    state = TrainingState(accelerator, state_module, optimizer, lr_scheduler, run.identity, recorded)
    progress = resume_progress(run, state)
    if run.log_with:
        accelerator.init_trackers(args.log_tracker_name or tracker_name, config=tracker_config(recorded),
                                  init_kwargs=tracker_init_kwargs(args))
    hooks = CheckpointHooks(args=args, accelerator=accelerator, state=state, save_weights=save_weights,
                            trainable=trainable, dit=dit, optimizer=optimizer, max_steps=max_steps,
                            sampler=run.sampler, swapper=swapper,
                            histograms=_histogram_writer(accelerator) if run.log_with else None)
    optimizer_train(optimizer)  # schedule-free optimizers start (and resume from a final state) in eval mode
    try:  # trackers are flushed and closed however the run ends (an error, Ctrl+C)
        with StopRequest() as stop:
            loop = TrainingLoop(arch=run.arch, dit=dit, params=params, data=run.data, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, accelerator=accelerator, args=args, progress=progress,
                                max_steps=max_steps, hooks=hooks, fused=fused, before_step=before_step,
                                after_step=after_step, stop=stop)
            if args.sample_at_first and progress.global_step == 0:
                hooks.sample("000000")
            with logging_redirect_tqdm():  # log lines go above the progress bar, not into it
                loop.run()
            if loop.stopped:
                _save_interrupted(run, hooks, progress, stop)

        final = hooks.save(args.output_name, progress)
        if args.save_state_on_train_end or args.save_state:
            hooks.save_state(f"{args.output_name}-state", progress)
    finally:
        accelerator.end_training()
    path = final or Path(args.output_dir) / f"{args.output_name}.safetensors"
    ends = hooks.step_ends
    return TrainingResult(path, hooks.losses, progress.global_step, [b - a for a, b in zip(ends, ends[1:])])
