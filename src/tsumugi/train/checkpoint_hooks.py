"""What happens between optimizer steps: checkpoints, states, pruning, samples, logs, the NaN stop."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tsumugi.errors import UserError
from tsumugi.models.safetensors_write import DiskFullError
from tsumugi.train.config import TrainConfig
from tsumugi.train.optimizers import optimizer_eval, optimizer_train
from tsumugi.train.state import TrainingState, TrainProgress, is_complete
from tsumugi.train.step_snapshot import StepSnapshot

if TYPE_CHECKING:
    from accelerate import Accelerator

    from tsumugi.memory.block_swap import BlockSwapper
    from tsumugi.train.sample_prompts import TrainingSampler

logger = logging.getLogger(__name__)


class CheckpointHooks:
    """Saving, sampling and logging at step and epoch boundaries, for LoRA training and full fine-tuning.

    ``save_weights(path, progress)`` writes the trained weights (a LoRA file or a DiT checkpoint) on the
    main process; ``trainable`` is the module switched to ``eval()`` while sampling (the LoRA network,
    whose dropout must be off), or ``None``.
    """

    def __init__(self, *, args: TrainConfig, accelerator: Accelerator, state: TrainingState,
                 save_weights: Callable[[Path, TrainProgress], None], trainable: torch.nn.Module | None,
                 dit: torch.nn.Module, optimizer: torch.optim.Optimizer, max_steps: int,
                 sampler: TrainingSampler | None, swapper: BlockSwapper | None, histograms: Any) -> None:
        # histograms: TensorBoard's SummaryWriter of the run, or None (no tensorboard tracker)
        self.args, self.acc, self.save_weights, self.trainable = args, accelerator, save_weights, trainable
        self.state = state
        self.snapshot = StepSnapshot(state) if swapper is None and StepSnapshot.affordable(state) else None
        self.dit, self.optimizer, self.max_steps = dit, optimizer, max_steps
        self.sampler, self.swapper, self.histograms = sampler, swapper, histograms
        self.epoch_first_step = 0
        self.output = Path(args.output_dir)
        self.last_sampled_step = -1
        self.losses: list[float] = []
        self.step_ends: list[float] = []

    # -- files
    def save(self, name: str, progress: TrainProgress) -> Path | None:
        """Write ``<output_dir>/<name>.safetensors`` (main process only; others return ``None``).

        A schedule-free optimizer is in eval mode meanwhile, so the file holds its averaged weights; every
        process switches, so the weights stay identical across processes. Non-finite weights are never
        written. When the disk is full, the file goes to the first fallback folder with room: next to the
        output folder, the working folder, the temp folder.
        """
        optimizer_eval(self.optimizer)
        try:
            if not self.acc.is_main_process:
                return None
            if not self.weights_finite():
                raise UserError(f"the weights are not finite after step {progress.global_step}: "
                                f"{name}.safetensors was not written{self._latest_state_hint()}")
            path = self.output / f"{name}.safetensors"
            try:
                self.save_weights(path, progress)
            except DiskFullError as full:
                return self._save_elsewhere(path, progress, full)
            logger.info("saved %s", path)
            return path
        finally:
            optimizer_train(self.optimizer)

    def _save_elsewhere(self, path: Path, progress: TrainProgress, full: DiskFullError) -> Path:
        tried = []
        for folder in (self.output.resolve().parent, Path.cwd(), Path(tempfile.gettempdir())):
            target = folder / path.name
            if folder in tried or target.resolve() == path.resolve():
                continue
            tried.append(folder)
            try:
                self.save_weights(target, progress)
            except (OSError, DiskFullError) as e:  # DiskFullError is a UserError, not an OSError
                logger.warning("fallback %s failed too: %s", target, e)
                continue
            logger.error("%s; saved it to %s instead", full, target)
            return target
        raise UserError(f"{full}; the fallback folders {', '.join(map(str, tried))} had no room either") from full

    def weights_finite(self) -> bool:
        groups: dict[torch.device, list[torch.Tensor]] = {}
        for p in self.state.module.parameters():
            if p.requires_grad:
                groups.setdefault(p.device, []).append(torch.isfinite(p.detach()).all())
        return all(bool(torch.stack(flags).all().item()) for flags in groups.values())

    def _latest_state_hint(self) -> str:
        states = [p for p in self.output.glob(f"{self.args.output_name}*-state")
                  if "-nan-" not in p.name and is_complete(p)]
        if not states:
            return " (no earlier state was saved in the output folder)"
        latest = max(states, key=lambda p: p.stat().st_mtime)
        return f"; the latest good state saved is {latest} (lower --learning_rate and --resume it)"

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
        if self.sampler is None:
            return
        optimizer_eval(self.optimizer)  # schedule-free: sample the averaged weights (on every process, see save)
        try:
            if self.acc.is_main_process:
                self._render(label)
        finally:
            optimizer_train(self.optimizer)

    def _render(self, label: str) -> None:
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
    def before_update(self, progress: TrainProgress) -> None:
        """Right before the weights of the step after ``progress`` change: keep the state to fall back to."""
        if self.snapshot is not None:
            self.snapshot.take(progress)

    def on_step(self, progress: TrainProgress, loss: float, average: float, sigmas: torch.Tensor) -> None:
        args, step, name = self.args, progress.global_step, self.args.output_name
        if not self.weights_finite():
            self._stop_non_finite(progress, f"the weights are not finite after step {step}", step - 1,
                                  live_usable=False)
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
        """The loss of the step after ``progress`` is not finite: stop, saving the state before the bad step.

        A step whose update made the weights huge but finite only shows in the next step's loss, so
        the state before the previous step is saved when the snapshot holds it.
        """
        self._stop_non_finite(progress, f"loss is {value} at step {progress.global_step + 1} "
                                        f"(epoch {progress.epoch + 1})", progress.global_step - 1,
                              live_usable=True)

    def _stop_non_finite(self, progress: TrainProgress, what: str, wanted_step: int, *, live_usable: bool) -> None:
        """Save the state after ``wanted_step`` steps if the snapshot holds it, else the live one if usable."""
        note = f"before step {progress.global_step + 1}"
        snapshot = self.snapshot
        if snapshot is not None and snapshot.progress is not None and snapshot.progress.global_step == wanted_step:
            progress = snapshot.restore()
            note = f"before step {wanted_step + 1} (whose update may have caused it)"
        elif not live_usable:  # the live weights are damaged and no copy was kept
            raise UserError(f"{what}; no state was saved{self._latest_state_hint()}")
        name = f"{self.args.output_name}-nan-step{progress.global_step:08d}-state"
        self.save_state(name, progress)
        raise UserError(
            f"{what}; the state {note} is saved in {self.output / name} (lower --learning_rate or check the "
            "data, then --resume it)"
        )
