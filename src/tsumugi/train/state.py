"""Training state on disk: what ``--save_state`` writes and ``--resume`` reads.

A state folder holds accelerate's state (optimizer, LR scheduler, grad scaler, RNG states, the LoRA
network as a registered object) and ``tsumugi_state.json`` with the step counter and the position in
the data stream. Resuming continues from exactly that position with the same per-step random draws,
so N steps + resume + N steps equals 2N steps (Musubi restarts its counters at 0).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from tsumugi.errors import UserError
from tsumugi.models.safetensors_io import give_default_modes

STATE_FILE = "tsumugi_state.json"


@dataclass
class TrainProgress:
    global_step: int = 0
    """optimizer steps done"""
    epoch: int = 0
    """epoch of the next micro-batch"""
    batch_index: int = 0
    """index of the next micro-batch within this process's share of that epoch"""
    seed: int = 0


def save_state(accelerator, progress: TrainProgress, directory: Path) -> Path:
    """Write the state to a temporary folder, then rename it into place (an older one is replaced)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        give_default_modes(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(progress), indent=1))
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    accelerator.wait_for_everyone()
    return directory


def load_state(accelerator, directory: str | Path) -> TrainProgress:
    directory = Path(directory)
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--resume: {directory} is not a tsumugi state folder (no {STATE_FILE})")
    accelerator.load_state(str(directory))
    return TrainProgress(**json.loads(state_file.read_text()))
