"""What happens between optimizer steps: checkpoints, states, pruning, samples, logs, the NaN stop."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tsumugi.errors import UserError
from tsumugi.train.state import TrainingState, TrainProgress

logger = logging.getLogger(__name__)


class CheckpointHooks:
    """Saving, sampling and logging at step and epoch boundaries, for LoRA training and full fine-tuning.

    ``save_weights(path, progress)`` writes the trained weights (a LoRA file or a DiT checkpoint) on the
    main process; ``trainable`` is the module switched to ``eval()`` while sampling (the LoRA network,
    whose dropout must be off), or ``None``.
    """

    def __init__(self, *, args, accelerator, state: TrainingState, save_weights: Callable[[Path, TrainProgress], None],
                 trainable: torch.nn.Module | None, dit, optimizer, max_steps, sampler, swapper,
                 histograms) -> None:
        self.args, self.acc, self.save_weights, self.trainable = args, accelerator, save_weights, trainable
        self.state = state
        self.dit, self.optimizer, self.max_steps = dit, optimizer, max_steps
        self.sampler, self.swapper, self.histograms = sampler, swapper, histograms
        self.epoch_first_step = 0
        self.output = Path(args.output_dir)
        self.last_sampled_step = -1
        self.losses: list[float] = []
        self.step_ends: list[float] = []

    # -- files
    def save(self, name: str, progress: TrainProgress) -> Path | None:
        """Write ``<output_dir>/<name>.safetensors`` (main process only; others return ``None``)."""
        if not self.acc.is_main_process:
            return None
        path = self.output / f"{name}.safetensors"
        self.save_weights(path, progress)
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
        self.state.save(progress, self.output / name)

    def sample(self, label: str) -> None:
        if self.sampler is None or not self.acc.is_main_process:
            return
        if self.trainable is not None:
            self.trainable.eval()
        if self.swapper is not None:
            self.swapper.set_mode("forward")
        self.sampler.render(self.dit, label)
        if self.swapper is not None:
            self.swapper.set_mode("train")
        if self.trainable is not None:
            self.trainable.train()

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
            self.save(f"{name}-step{step:08d}", progress)
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
            self.save(f"{name}-{epoch:06d}", progress)
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
