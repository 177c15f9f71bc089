"""Training state on disk: what ``--save_state`` writes and ``--resume`` reads.

A state folder is data, never code: nothing in it is unpickled. It holds

- ``weights.safetensors``: the trained module's state dict (the LoRA network, or the DiT);
- ``optimizer.safetensors``: the optimizer's state tensors;
- ``rng-<process>.json``: each process's torch/CUDA/Python/NumPy random states;
- ``tsumugi_state.json``: the step counter and data position, the optimizer/scheduler/grad-scaler state
  dicts with their tensors replaced by references into ``optimizer.safetensors``, what defines the run
  (network, optimizer, data: checked on resume, see :mod:`tsumugi.train.resume_rules`), every flag (a
  change takes effect and is logged), and the name and size of every file. It is written last: a folder without it is incomplete.
- ``.tsumugi-state``: a marker written first, so an interrupted ``.tmp`` folder is provably ours.

A folder is written as ``<name>.tmp`` and renamed into place (an older one is moved to ``<name>.old``
first and deleted after). :func:`recover_state_folder` finishes or undoes an interrupted save.
Resuming continues from exactly the saved position with the same per-step random draws, so N steps +
resume + N steps equals 2N steps.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsumugi.errors import UserError
from tsumugi.fault_points import pause_point
from tsumugi.models.safetensors_io import SafetensorsSource, read_header
from tsumugi.models.safetensors_write import LazyTensor, _fsync_dir, save_file_streamed, write_text_atomic
from tsumugi.train.config import flag_items

logger = logging.getLogger(__name__)

FORMAT = 2
STATE_FILE = "tsumugi_state.json"
MARKER = ".tsumugi-state"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


@dataclass
class TrainProgress:
    global_step: int = 0
    """optimizer steps done"""
    epoch: int = 0
    """epoch of the next micro-batch"""
    batch_index: int = 0
    """index of the next micro-batch within this process's share of that epoch"""
    seed: int = 0


# ---- state dicts <-> JSON + tensors -----------------------------------------------------------------
class _Encoder:
    """Turns a state dict into JSON-able data; tensors go to ``self.tensors`` under a path-like key."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            self.tensors[path] = value.detach()
            return {"__tensor__": path}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self.encode(v, f"{path}.{k}") for k, v in value.items()}
            return {"__items__": [[self.encode(k, f"{path}.k{i}"), self.encode(v, f"{path}.{k}")]
                                  for i, (k, v) in enumerate(value.items())]}
        raise TypeError(f"{path}: a {type(value).__name__} cannot be stored in a state folder")


def _decode(value: Any, tensors: SafetensorsSource | None, where: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        key = value["__tensor__"]
        if tensors is None or key not in tensors:
            raise UserError(f"{where}: tensor {key!r} is missing (a damaged state folder)")
        return tensors.get(key)
    if "__dtype__" in value:
        dtype = getattr(torch, str(value["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{where}: unknown dtype {value['__dtype__']!r}")
        return dtype
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- folder checks and recovery -------------------------------------------------------------------------
def _sibling(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def is_ours(folder: Path) -> bool:
    """A folder tsumugi wrote (it has the marker, or the state file of any format)."""
    return (folder / MARKER).is_file() or (folder / STATE_FILE).is_file()


def is_complete(folder: Path) -> bool:
    try:
        return read_state_file(folder) is not None
    except UserError:
        return False


def _set_aside(folder: Path, why: str) -> None:
    """Move a folder that is not provably ours out of the way (never delete it)."""
    aside = folder.with_name(f"{folder.name}.{time.strftime('%Y%m%d%H%M%S')}.{os.getpid()}")
    os.replace(folder, aside)
    logger.warning("%s %s; moved it to %s", folder, why, aside)


def recover_state_folder(directory: Path) -> None:
    """Finish or undo a save of ``directory`` that was interrupted between its renames.

    ``<name>.old`` complete and ``<name>`` missing: the crash came between the two renames; the old
    state is restored. ``<name>.old`` next to a complete ``<name>``: the crash came before the old one
    was deleted; it is deleted if it is ours, set aside otherwise. ``<name>.tmp``: an unfinished save;
    deleted if it is ours, set aside otherwise. Main process only.
    """
    directory = Path(directory)
    old, tmp = _sibling(directory, ".old"), _sibling(directory, ".tmp")
    if old.is_dir():
        if not directory.exists() and is_complete(old):
            os.replace(old, directory)
            logger.warning("%s: restored the previous state from %s (a save was interrupted)", directory, old.name)
        elif directory.exists() and is_ours(old):
            shutil.rmtree(old)
        else:
            _set_aside(old, "is left over from an interrupted save")
    if tmp.is_dir():
        if (tmp / MARKER).is_file():
            shutil.rmtree(tmp)
            logger.info("removed the unfinished state %s", tmp)
        else:
            _set_aside(tmp, "is in the way of a state save and has no tsumugi marker")


def read_state_file(directory: Path) -> dict[str, Any]:
    """The parsed ``tsumugi_state.json`` of a complete state folder, every listed file checked.

    Raises :class:`UserError` naming the file for a missing, truncated or garbled part, and for a
    folder in the old pickle-based format.
    """
    directory = Path(directory)
    state_file = directory / STATE_FILE
    if not directory.is_dir():
        raise UserError(f"--resume: {directory} is not a folder")
    if not state_file.is_file():
        if any(p.suffix in (".pkl", ".bin", ".pt") for p in directory.iterdir()):
            raise UserError(f"--resume: {directory} is a state folder of another format (accelerate's Python "
                            "pickles); tsumugi does not load pickles from a state folder (loading one can run code)")
        raise UserError(f"--resume: {directory} is not a complete tsumugi state folder (no {STATE_FILE}; "
                        "an interrupted save?)")
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--resume: {state_file} is damaged ({e})") from e
    if data.get("format") != FORMAT:
        raise UserError(
            f"--resume: {directory} is a state folder in an older format, whose files are Python pickles; "
            "tsumugi does not load pickles from a state folder (loading one can run code). Continue from the "
            "saved weights instead (--network_weights for LoRA, --dit for full fine-tuning)"
        )
    try:
        files = {str(k): int(v) for k, v in data["files"].items()}
        TrainProgress(**data["progress"])
        for key in ("identity", "flags", "optimizer", "scheduler", "processes"):
            data[key]  # noqa: B018
        bad = [n for n in files if "/" in n or "\\" in n or n.startswith(".")]
        missing = [n for n in (WEIGHTS_FILE, OPTIMIZER_FILE) if n not in files]
        if bad or missing:
            raise ValueError(f"file list: unexpected {bad}, missing {missing}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"--resume: {state_file} is damaged (missing or bad entry: {e})") from e
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"--resume: {path} is missing (the state folder is incomplete)")
        if path.stat().st_size != size:
            raise UserError(f"--resume: {path} has {path.stat().st_size} bytes, the state recorded {size} "
                            "(truncated or replaced)")
        if name.endswith(".safetensors"):
            read_header(path)
        else:
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise UserError(f"--resume: {path} is damaged ({e})") from e
    return data


def find_resume_folder(path: str | Path) -> Path:
    """``path``, after recovering an interrupted save of it (main process)."""
    path = Path(path)
    recover_state_folder(path)
    return path


# ---- what a run is ----------------------------------------------------------------------------------------
# Flags that may change on resume without a message: where the run writes and how it reports.
_QUIET = {"resume", "seed", "output_dir", "logging_dir", "log_prefix", "log_tracker_name", "log_with",
          "log_config", "wandb_api_key", "wandb_run_name", "config_file"}


def plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)


def plain_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): plain_tree(v) for k, v in value.items()}
    return plain(value)


def flag_values(args) -> dict[str, Any]:
    """Every flag of the run's script as JSON-able data (parsed flags or a :class:`TrainConfig`)."""
    return {k: plain(v) for k, v in sorted(flag_items(args).items()) if not k.startswith("_")}


# ---- the state of a run -----------------------------------------------------------------------------------
def _inner(scheduler):
    return getattr(scheduler, "scheduler", scheduler)


@dataclass
class TrainingState:
    """The objects a state folder saves and restores, and what defines the run."""

    accelerator: Any
    module: torch.nn.Module
    optimizer: Any
    scheduler: Any
    identity: dict[str, Any]
    args: Any

    # -- saving
    def save(self, progress: TrainProgress, directory: Path) -> Path:
        """Write the state to ``<directory>.tmp``, then rename it into place (an older one is replaced)."""
        acc, directory = self.accelerator, Path(directory)
        tmp = _sibling(directory, ".tmp")
        try:
            return self._save(progress, directory, tmp)
        except BaseException:
            if acc.is_main_process and (tmp / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)  # ours and unfinished; the previous state is intact
            raise

    def _save(self, progress: TrainProgress, directory: Path, tmp: Path) -> Path:
        acc = self.accelerator
        if acc.is_main_process:
            recover_state_folder(directory)
            tmp.mkdir(parents=True)
            write_text_atomic(tmp / MARKER, "tsumugi training state (being written)\n")
        acc.wait_for_everyone()
        write_text_atomic(tmp / rng_file(acc.process_index), json.dumps(_rng_state()))
        if acc.is_main_process:
            save_file_streamed({k: LazyTensor.of(v) for k, v in self.module.state_dict().items()},
                               tmp / WEIGHTS_FILE)
            pause_point("state-write")
            encoder = _Encoder()
            optimizer = encoder.encode(self.optimizer.state_dict(), "optimizer")
            save_file_streamed({k: LazyTensor.of(v) for k, v in encoder.tensors.items()}, tmp / OPTIMIZER_FILE)
            scaler = getattr(acc, "scaler", None)
            scheduler_encoder = _Encoder()
            scheduler = scheduler_encoder.encode(_inner(self.scheduler).state_dict(), "scheduler")
            if scheduler_encoder.tensors:
                raise TypeError("the LR scheduler's state holds tensors; it cannot be stored as JSON")
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != MARKER}
            data = {
                "format": FORMAT, "progress": asdict(progress), "identity": plain_tree(self.identity),
                "flags": flag_values(self.args), "optimizer": optimizer,
                "scheduler": {"class": type(_inner(self.scheduler)).__name__, "state": scheduler},
                "scaler": _Encoder().encode(scaler.state_dict(), "scaler") if scaler is not None else None,
                "processes": acc.num_processes, "files": files,
            }
            write_text_atomic(tmp / STATE_FILE, json.dumps(data, indent=1))
            _fsync_dir(tmp)
            old = _sibling(directory, ".old")
            if directory.exists():
                os.replace(directory, old)
                pause_point("state-rename")
            os.replace(tmp, directory)
            _fsync_dir(directory.parent)
            pause_point("state-cleanup")
            if old.exists():
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return directory

    # -- loading
    def load(self, directory: Path, data: dict[str, Any]) -> TrainProgress:
        """Restore everything saved in ``directory`` (``data``: its checked state file)."""
        acc, directory = self.accelerator, Path(directory)
        weights = directory / WEIGHTS_FILE
        with SafetensorsSource([weights]) as source:
            target = self.module.state_dict()
            if set(source.keys()) != set(target):
                raise UserError(f"--resume: {weights} holds other tensors than the network being trained "
                                f"({len(source)} saved, {len(target)} now)")
            with torch.no_grad():
                for key, tensor in target.items():
                    if source.info(key).shape != tuple(tensor.shape):
                        raise UserError(f"--resume: {weights}: {key} has shape {source.info(key).shape}, the "
                                        f"network has {tuple(tensor.shape)}")
                    tensor.copy_(source.get(key))
        scheduler = _inner(self.scheduler)
        new_base_lrs = list(getattr(scheduler, "base_lrs", []))
        with SafetensorsSource([directory / OPTIMIZER_FILE]) as source:
            state = _decode(data["optimizer"], source, directory / OPTIMIZER_FILE)
            try:
                self.optimizer.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
                raise UserError(f"--resume: {directory / OPTIMIZER_FILE} does not fit the optimizer ({e})") from e
        saved_class = data["scheduler"]["class"]
        if saved_class != type(scheduler).__name__:
            raise UserError(f"--resume: the state's LR scheduler is {saved_class}, this run's is "
                            f"{type(scheduler).__name__} (--lr_scheduler must stay the same)")
        saved = _decode(data["scheduler"]["state"], None, directory / STATE_FILE)
        unknown = set(saved) - set(scheduler.state_dict()) if isinstance(saved, dict) else {"(not a dict)"}
        if unknown:  # load_state_dict sets attributes: only the scheduler's own
            raise UserError(f"--resume: {directory / STATE_FILE}: unexpected LR scheduler entries {sorted(unknown)}")
        scheduler.load_state_dict(saved)
        scaler = getattr(acc, "scaler", None)
        if scaler is not None and data.get("scaler") is not None:
            scaler.load_state_dict(_decode(data["scaler"], None, directory / STATE_FILE))
        rng = directory / rng_file(acc.process_index)
        if data["processes"] == acc.num_processes and rng.is_file():
            _set_rng_state(json.loads(rng.read_text(encoding="utf-8")))
        progress = TrainProgress(**{f.name: data["progress"][f.name] for f in fields(TrainProgress)})
        self._apply_changed_flags(data["flags"], new_base_lrs)
        return progress

    def _apply_changed_flags(self, saved: dict[str, Any], new_base_lrs: list[float]) -> None:
        """Flags changed on purpose take effect (the learning rate too); each change is logged."""
        now = flag_values(self.args)
        changed = [k for k in sorted(set(saved) | set(now)) if k not in _QUIET and saved.get(k) != now.get(k)]
        if self.accelerator.is_main_process:
            for key in changed:
                logger.info("resume: --%s %s (was %s) takes effect", key, now.get(key), saved.get(key))
        scheduler = _inner(self.scheduler)
        lr_changed = bool(new_base_lrs) and list(scheduler.base_lrs) != new_base_lrs
        if not lr_changed and not any(k.startswith(("lr_", "max_train")) for k in changed):
            return
        # the new base LRs and schedule apply from the current step on
        scheduler.base_lrs = new_base_lrs
        for group, base in zip(self.optimizer.param_groups, new_base_lrs):
            group["initial_lr"] = base
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(new_base_lrs, lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
