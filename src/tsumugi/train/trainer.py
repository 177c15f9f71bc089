"""The flow-matching trainer shared by both families, for LoRA training and full fine-tuning.

One optimizer step = ``gradient_accumulation_steps`` micro-batches taken in order from the epoch
plan; the last step of an epoch takes what is left of it (fewer micro-batches, its loss averaged over
those), so an epoch is one pass over the data and never spills into the next. Every random draw (noise, sigma) of an item comes from a generator seeded with (seed, step, item), so
results do not depend on what ran before: resuming is exact, and a batch of N equals N accumulated
batches of 1 up to float rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tsumugi.arch.base import Architecture, ImageGeometry, PromptEmbeds
from tsumugi.caching.validate import CachedItem
from tsumugi.errors import UserError
from tsumugi.fault_points import pause_point
from tsumugi.train.cached_data import CachedTrainingData
from tsumugi.train.config import TrainConfig
from tsumugi.train.loss_weighting import flow_matching_target, loss_weights, noisy_input, weighted_mse
from tsumugi.train.state import TrainProgress
from tsumugi.train.timesteps import TimestepConfig, model_timesteps, sample_sigmas

if TYPE_CHECKING:
    from accelerate import Accelerator

    from tsumugi.train.checkpoint_hooks import CheckpointHooks
    from tsumugi.train.fused_adafactor import FusedBackwardStep
    from tsumugi.train.interrupts import StopRequest

logger = logging.getLogger(__name__)

# torch's warning when the scheduler steps and optimizer.step() was never called (true of the fused
# backward pass, which steps each parameter inside the backward instead)
_SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def item_generator(seed: int, step: int, item: CachedItem, occurrence: int) -> torch.Generator:
    """The CPU generator of one item in one optimizer step.

    Keyed by the item (its dataset's index in the config and its cache file's name, unique within that
    dataset) rather than its position, so the same step draws the same noise and sigma for an item
    whether it comes in a batch of N or in N accumulated batches of 1, and a resumed run draws exactly
    what an uninterrupted one would. The same image in two datasets draws differently, and so does each
    repeat of an item within one step (``occurrence``).
    """
    key = f"{seed}:{step}:{item.dataset_index}:{item.latent_path.name}:{occurrence}"
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def micro_batch_loss(
    arch: Architecture,
    dit: torch.nn.Module,
    data: CachedTrainingData,
    items: list[CachedItem],
    generators: list[torch.Generator],
    timesteps: TimestepConfig,
    weighting: str,
    device: torch.device,
    autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching loss of one micro-batch: ``mean(w(sigma) * (v_pred - (noise - x0))^2)``."""
    batch = data.load(items)
    width, height = batch.bucket
    sizes = tuple((c.shape[-2], c.shape[-1]) for c in batch.controls)
    geometry = ImageGeometry(height=height, width=width, control_latent_sizes=sizes)
    x0 = arch.latents_from_cache(batch.latents).to(device)
    conditions = None
    if batch.controls:  # Edit: clean control tokens follow the target; the loss covers the target only
        conditions = torch.cat([arch.latents_from_cache(c) for c in batch.controls], dim=1).to(device)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)
    sigmas = torch.cat([sample_sigmas(timesteps, 1, geometry.num_tokens, g) for g in generators]).to(device)
    noisy = noisy_input(x0, noise, sigmas)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generators[0])))  # LoRA dropout draws
    with autocast():
        pred = arch.predict_velocity(
            dit, noisy, model_timesteps(sigmas), [PromptEmbeds(t) for t in batch.text], geometry, conditions
        )
    loss = weighted_mse(pred, flow_matching_target(x0, noise), loss_weights(weighting, sigmas))
    return loss, sigmas.detach().cpu()


def data_stream(data: CachedTrainingData, progress: TrainProgress, rank: int, world: int) -> Iterator[tuple[int, int, list]]:
    """(epoch, index, items) from the saved position on; each process takes every ``world``-th batch."""
    epoch, index = progress.epoch, progress.batch_index
    while True:
        batches = data.epoch(progress.seed, epoch)
        share = batches[rank::world][: len(batches) // world]
        if not share:
            raise UserError(f"the dataset has {len(batches)} batch(es) per epoch, fewer than {world} processes")
        for i in range(index, len(share)):
            yield epoch, i, share[i]
        epoch, index = epoch + 1, 0


def steps_per_epoch(data: CachedTrainingData, world: int, accumulation: int) -> int:
    """Optimizer steps of one epoch: its last step takes the remaining (possibly fewer) micro-batches."""
    return math.ceil((data.batches_per_epoch() // world) / accumulation)


def resolve_seed(args: TrainConfig) -> int:
    """``--seed``, or a random seed when it is omitted."""
    return int(args.seed) if args.seed is not None else random.SystemRandom().randint(0, 2**32 - 1)


class TrainingLoop:
    """Runs optimizer steps and calls the hooks' ``on_step``/``on_epoch_end`` (saving, sampling, logging).

    ``params`` are the trainable tensors (LoRA weights or the DiT's own). ``fused``, when given, steps each
    parameter inside the backward pass (``--fused_backward_pass``): the loop then only tells it which
    micro-batch is the last of a step, and never calls ``optimizer.step()`` itself. ``before_step`` runs
    after gradients are complete and clipped, right before the optimizer step; ``after_step`` right after it.
    """

    def __init__(self, *, arch: Architecture, dit: torch.nn.Module, params: list[torch.Tensor],
                 data: CachedTrainingData, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                 accelerator: Accelerator, args: TrainConfig, progress: TrainProgress, max_steps: int,
                 hooks: CheckpointHooks, fused: FusedBackwardStep | None = None,
                 before_step: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
                 stop: StopRequest | None = None) -> None:
        # lr_scheduler: a torch LR scheduler as prepared by accelerate (AcceleratedScheduler wraps it)
        self.arch, self.dit, self.data = arch, dit, data
        self.optimizer, self.lr_scheduler, self.accelerator = optimizer, lr_scheduler, accelerator
        self.args, self.progress, self.max_steps, self.hooks = args, progress, max_steps, hooks
        self.fused, self.before_step, self.after_step = fused, before_step, after_step
        self.timesteps = TimestepConfig.from_args(args)
        self.params = [p for p in params if p.requires_grad]
        self.recent: list[float] = []
        self.stop = stop
        """a :class:`~tsumugi.train.interrupts.StopRequest`: the loop ends after the step in which it is set"""
        self.stopped = False

    def _anywhere(self, flag: bool) -> bool:
        """``flag`` is true on any process (all processes must agree before a collective save)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _sync_gradients(self, bucket_bytes: int = 64 << 20) -> None:
        """Average gradients over processes, in buckets of at most ``bucket_bytes`` per dtype and device.

        The explicit all-reduce replaces DDP: the LoRA network's own forward never runs, and a full
        fine-tune's gradients may sit on different devices (block swap).
        """
        if self.accelerator.num_processes == 1:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in groups.values():
            start = 0
            while start < len(grads):
                end, size = start, 0
                while end < len(grads) and (end == start or size + grads[end].nbytes <= bucket_bytes):
                    size += grads[end].nbytes
                    end += 1
                bucket = grads[start:end]
                flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in bucket]), reduction="mean")
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
                start = end

    def run(self) -> None:
        args, acc, progress = self.args, self.accelerator, self.progress
        stream = data_stream(self.data, progress, acc.process_index, acc.num_processes)
        bar = tqdm(total=self.max_steps, initial=progress.global_step, desc="steps",
                   disable=not acc.is_local_main_process)
        accumulation = args.gradient_accumulation_steps
        share_len = self.data.batches_per_epoch() // acc.num_processes
        while progress.global_step < self.max_steps:
            total, all_sigmas, epoch_ended, seen = 0.0, [], False, Counter()
            count = min(accumulation, share_len - progress.batch_index)  # micro-batches left in this epoch
            at_start = dataclasses.replace(progress)
            for micro in range(count):
                epoch, index, items = next(stream)
                generators = []
                for item in items:
                    generators.append(item_generator(progress.seed, progress.global_step, item, seen[item]))
                    seen[item] += 1
                if self.fused is not None:
                    self.fused.begin_micro_batch(is_last=micro == count - 1)
                loss, sigmas = micro_batch_loss(
                    self.arch, self.dit, self.data, items, generators, self.timesteps, args.weighting_scheme,
                    acc.device, acc.autocast,
                )
                if self._anywhere(not torch.isfinite(loss).item()):
                    self.hooks.on_nan(at_start, loss.item())  # nothing has changed the weights of this step yet
                if micro == count - 1:
                    self.hooks.before_update(at_start)
                acc.backward(loss / count)
                total += loss.item() / count
                all_sigmas.append(sigmas)
                if index + 1 >= share_len:
                    progress.epoch, progress.batch_index, epoch_ended = epoch + 1, 0, True
                else:
                    progress.epoch, progress.batch_index = epoch, index + 1
            if self.fused is None:
                self._sync_gradients()
                if args.max_grad_norm and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, args.max_grad_norm)
                if self.before_step is not None:
                    self.before_step()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if self.fused is None:
                self.lr_scheduler.step()
            else:
                with warnings.catch_warnings():  # the fused pass stepped every parameter; torch cannot see it
                    warnings.filterwarnings("ignore", _SCHEDULER_ORDER_WARNING, UserWarning)
                    self.lr_scheduler.step()
            if self.after_step is not None:
                self.after_step()
            progress.global_step += 1
            self.recent = (self.recent + [total])[-max(1, share_len):]
            average = sum(self.recent) / len(self.recent)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", avg=f"{average:.4f}")
            self.hooks.on_step(progress, total, average, torch.cat(all_sigmas))
            if epoch_ended:
                self.hooks.on_epoch_end(progress)
            pause_point("train-step")
            if self.stop is not None and self._anywhere(self.stop.requested):
                self.stopped = True
                break
        bar.close()
