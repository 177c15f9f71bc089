"""A CPU copy of the training state taken before each optimizer step, for the non-finite stop.

When a step turns the weights non-finite, or the next step's loss is non-finite, the state saved for
``--resume`` must be the one from before that step: the live one is already damaged. The copy costs
one device-to-host transfer of the trained weights and the optimizer state per step, so it is kept
only when those fit in :data:`SNAPSHOT_LIMIT_BYTES` (LoRA training; a small DiT) and without block
swap; otherwise the stop points to the latest state saved on disk.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from tsumugi.train.state import TrainingState, TrainProgress

SNAPSHOT_LIMIT_BYTES = 2 << 30


def _to_cpu(value: Any, into: Any = None) -> Any:
    if isinstance(value, torch.Tensor):
        if isinstance(into, torch.Tensor) and into.shape == value.shape and into.dtype == value.dtype:
            return into.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _to_cpu(v, into.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


class StepSnapshot:
    def __init__(self, state: TrainingState) -> None:
        self.state = state
        self.progress: TrainProgress | None = None
        self._module: dict[str, torch.Tensor] = {}
        self._optimizer: dict[str, Any] = {}
        self._scheduler: dict[str, Any] = {}

    @staticmethod
    def affordable(state: TrainingState) -> bool:
        """Weights plus (at most) two optimizer moments fit in the limit."""
        weights = sum(t.numel() * t.element_size() for t in state.module.state_dict().values())
        return 3 * weights <= SNAPSHOT_LIMIT_BYTES

    def take(self, progress: TrainProgress) -> None:
        self.progress = dataclasses.replace(progress)
        self._module = _to_cpu(self.state.module.state_dict(), self._module)
        self._optimizer = _to_cpu(self.state.optimizer.state_dict(), self._optimizer)
        self._scheduler = copy.deepcopy(getattr(self.state.scheduler, "scheduler", self.state.scheduler).state_dict())

    def restore(self) -> TrainProgress:
        """Put the copy back into the live objects; returns its progress."""
        assert self.progress is not None
        self.state.module.load_state_dict(self._module)
        self.state.optimizer.load_state_dict(self._optimizer)
        getattr(self.state.scheduler, "scheduler", self.state.scheduler).load_state_dict(self._scheduler)
        return dataclasses.replace(self.progress)
