"""What a resume must keep: the values that define the network and the data (see docs/reliability.md).

They are stored in every state folder; ``--resume`` with different values is refused, listing each
difference, before any model loads. Every other flag may change on resume and takes effect
(:meth:`tsumugi.train.state.TrainingState.load` logs each change).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from tsumugi.errors import UserError
from tsumugi.train.state import plain_tree, read_state_file


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value
    return out


def identity_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved X vs now Y`` for each entry of the two identities that differs."""
    a, b = _flatten(saved, "", {}), _flatten(plain_tree(now), "", {})
    return [f"{key}: saved {a.get(key, '(none)')!r} vs now {b.get(key, '(none)')!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def check_resume(path: str | Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Check ``--resume`` before any model loads: complete, undamaged, and the same run.

    Returns the parsed state file. Raises :class:`UserError` listing every defining value that differs.
    Every process checks (so all stop together); recovering an interrupted save is the main process's
    job, before (:func:`tsumugi.train.state.find_resume_folder`).
    """
    directory = Path(path)
    data = read_state_file(directory)
    differences = identity_differences(data["identity"], identity)
    if differences:
        raise UserError(
            f"--resume {directory}: the run differs from the saved one in what defines the network or the "
            "data (these must stay the same on resume; start a new run to change them): " + "; ".join(differences)
        )
    return data


def _file_identity(path: str | None) -> Any:
    """Size and header digest of a model file (the same file moved elsewhere still matches)."""
    if not path or not Path(path).is_file():
        return path
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(length, 100 << 20))).hexdigest()[:16]
    return {"bytes": p.stat().st_size, "header_sha256": digest}


def run_identity(arch_name: str, model_version: str, args, datasets, processes: int, *,
                 network: bool) -> dict[str, Any]:
    """What defines a run: a resume must have the same values (see docs/reliability.md)."""
    from tsumugi.train.optimizers import resolve_optimizer_class

    optimizer = resolve_optimizer_class(args.optimizer_type)
    identity: dict[str, Any] = {
        "architecture": arch_name, "model_version": model_version,
        "training": "LoRA" if network else "full fine-tune",
        "--optimizer_type": f"{optimizer.__module__}.{optimizer.__qualname__}",
        "--optimizer_args": list(args.optimizer_args or []),
        "--lr_scheduler": getattr(args, "lr_scheduler_type", None) or args.lr_scheduler,
        "processes": processes,
        "dataset": {
            d.name: {"images": str(d.image_directory or d.image_jsonl_file), "resolution": list(d.resolution),
                     "batch_size": d.batch_size, "num_repeats": d.num_repeats, "enable_bucket": d.enable_bucket,
                     "bucket_no_upscale": d.bucket_no_upscale, "items": len(d.items or ())}
            for d in datasets
        },
    }
    if network:
        identity.update({"--network_module": args.network_module, "--network_dim": args.network_dim,
                         "--network_alpha": args.network_alpha, "--network_args": list(args.network_args or [])})
    else:
        identity.update({"--dit": _file_identity(args.dit), "--full_bf16": bool(args.full_bf16)})
    return identity
