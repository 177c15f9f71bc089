"""What the logging and multi-process flags hand to accelerate, with Musubi Tuner's meaning.

``--log_config`` sends the settings to the trackers (secrets and file paths left out), ``--wandb_run_name``
becomes wandb's run name, ``--log_tracker_config`` is a TOML file of tracker init arguments (one table per
tracker; unlike Musubi, where the file replaces the run name, its values are merged over it), ``--wandb_api_key``
logs in to wandb before the run, and ``--ddp_timeout`` (minutes) is the process-group timeout.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from tsumugi.errors import UserError
from tsumugi.train.config import TrainConfig, flag_items

logger = logging.getLogger(__name__)

SECRET_FLAGS = ("wandb_api_key", "huggingface_token")
PATH_FLAGS = ("dit", "vae", "text_encoder", "tokenizer", "base_weights", "network_weights", "output_dir",
              "logging_dir", "resume", "config_file", "dataset_config", "sample_prompts", "log_tracker_config")
WANDB = ("wandb", "all")


def effective_log_with(args: TrainConfig) -> str | None:
    """``--log_with``, or ``tensorboard`` when only ``--logging_dir`` is given, else no logging."""
    return args.log_with or ("tensorboard" if args.logging_dir else None)


def load_tracker_config(path: str) -> dict[str, dict[str, Any]]:
    """The ``--log_tracker_config`` TOML file: ``{tracker name: {init argument: value}}``."""
    import toml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--log_tracker_config: {path} not found")
    try:
        data = toml.loads(file.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--log_tracker_config: {path} is not valid TOML ({exc})") from None
    for name, value in data.items():
        if not isinstance(value, dict):
            raise UserError(f"--log_tracker_config: {path}: '{name}' must be a table of init arguments for the "
                            f"tracker of that name, e.g. [wandb] or [tensorboard]")
    return data


def tracker_init_kwargs(args: TrainConfig) -> dict[str, dict[str, Any]]:
    """``init_kwargs`` of ``accelerator.init_trackers``."""
    kwargs: dict[str, dict[str, Any]] = {}
    if args.wandb_run_name:
        kwargs["wandb"] = {"name": args.wandb_run_name}
    if args.log_tracker_config:
        for tracker, values in load_tracker_config(args.log_tracker_config).items():
            kwargs.setdefault(tracker, {}).update(values)
    return kwargs


def tracker_config(args: TrainConfig) -> dict[str, Any] | None:
    """With ``--log_config``: the flags as tracker-friendly values (lists as text), without secrets and paths."""
    if not args.log_config:
        return None
    config: dict[str, Any] = {}
    for key, value in sorted(flag_items(args).items()):
        if key in SECRET_FLAGS or key in PATH_FLAGS:
            continue
        config[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return config


def kwargs_handlers(args: TrainConfig) -> list:
    """accelerate kwargs handlers: the process-group timeout of ``--ddp_timeout``."""
    from accelerate import InitProcessGroupKwargs

    if args.ddp_timeout:
        return [InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout))]
    return []


def prepare_wandb(args: TrainConfig, logging_dir: Path | None) -> None:
    """As Musubi: wandb writes under the log folder, and ``--wandb_api_key`` logs in first."""
    if logging_dir is not None:
        logging_dir.mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(logging_dir)
    if args.wandb_api_key:
        import wandb

        wandb.login(key=args.wandb_api_key)


def validate_logging_flags(args: argparse.Namespace) -> None:
    """Bad values fail and flags that would change nothing warn, before anything is loaded."""
    log_with = effective_log_with(args)
    if log_with in ("tensorboard", "all") and not args.logging_dir:
        raise UserError(f"--log_with {log_with} needs --logging_dir (the folder TensorBoard writes to)")
    if log_with not in WANDB:
        for flag in ("wandb_run_name", "wandb_api_key"):
            if getattr(args, flag):
                logger.warning("--%s has no effect without --log_with wandb (or all)", flag)
    if not log_with:
        for flag in ("log_tracker_config", "log_config"):
            if getattr(args, flag):
                logger.warning("--%s has no effect without --logging_dir or --log_with", flag)
    if args.log_tracker_config:
        load_tracker_config(args.log_tracker_config)
    if args.ddp_timeout is not None and args.ddp_timeout < 1:
        raise UserError(f"--ddp_timeout: must be >= 1 (minutes), got {args.ddp_timeout}")
