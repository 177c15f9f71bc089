"""The ``ss_*`` and ``modelspec.*`` metadata written with trained LoRA files and full fine-tunes
(``docs/design.md``, "LoRA files"). A full fine-tune gets the same set minus the network keys, and its
``modelspec.architecture`` has no ``/lora`` suffix.

Every ``ss_*`` key Musubi Tuner writes for its LoRA training is written, unset values as ``"None"`` as
Musubi does (its list: ``tests/train/musubi_lora_ss_keys.json``). Musubi leaves out the model hashes
(too slow on a multi-GB DiT); we add the two cheap ones, ``ss_sd_model_hash`` and ``ss_vae_hash``: the
"old" stable-diffusion-webui hash of the DiT and VAE files (SHA-256 of the 64 KiB at offset 1 MiB,
first 8 hex digits, :func:`legacy_model_hash`). The full-file SHA-256 (``ss_new_sd_model_hash``) would
read every byte of the DiT and is not written; the header-based identity that the caches use
(``caching.fingerprint.model_identity``, a few kilobytes read) is written as ``tsumugi.dit_identity``
and ``tsumugi.vae_identity`` instead."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tsumugi.data.config import DatasetConfig

BASE_MODEL_VERSION = {"original": "qwen_image", "edit": "qwen_image_edit", "edit-2509": "qwen_image_edit",
                      "edit-2511": "qwen_image_edit", "layered": "qwen_image_layered"}
ARCHITECTURE_TITLE = {"original": "Qwen-Image", "edit": "Qwen-Image-Edit", "edit-2509": "Qwen-Image-Edit-Plus",
                      "edit-2511": "Qwen-Image-Edit-2511", "layered": "Qwen-Image-Layered"}
IMPLEMENTATION = {"qwen_image": "https://github.com/QwenLM/Qwen-Image", "zimage": "https://github.com/Tongyi-MAI/Z-Image"}


def legacy_model_hash(path: str | Path) -> str | None:
    """stable-diffusion-webui's old model hash of a file, or None for a folder or a missing file."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _model_keys(args: argparse.Namespace) -> dict[str, Any]:
    from tsumugi.caching.fingerprint import model_identity

    out: dict[str, Any] = {"ss_sd_model_name": Path(args.dit).name, "ss_sd_model_hash": legacy_model_hash(args.dit),
                           "tsumugi.dit_identity": model_identity(args.dit)}
    if args.vae:
        out.update(ss_vae_name=Path(args.vae).name, ss_vae_hash=legacy_model_hash(args.vae),
                   **{"tsumugi.vae_identity": model_identity(args.vae)})
    return {k: v for k, v in out.items() if v is not None}  # no hash for a folder


def _dataset_summary(datasets: list[DatasetConfig]) -> str:
    out = []
    for d in datasets:
        entry: dict[str, Any] = {
            "resolution": list(d.resolution),
            "caption_extension": d.caption_extension,
            "batch_size_per_device": d.batch_size,
            "num_repeats": d.num_repeats,
            "enable_bucket": d.enable_bucket,
            "bucket_no_upscale": d.bucket_no_upscale,
            "has_control": d.has_control,
        }
        for key in ("image_directory", "image_jsonl_file", "control_directory"):
            value = getattr(d, key)
            if value is not None:
                entry[key] = Path(value).name
        out.append(entry)
    return json.dumps(out)


def lora_metadata(
    args: argparse.Namespace,
    arch_name: str,
    model_version: str,
    datasets: list[DatasetConfig],
    *,
    session_id: int,
    started_at: float,
    steps: int,
    epoch: int,
    num_batches_per_epoch: int,
    optimizer_name: str,
    num_epochs: int | None = None,
    network: bool = True,
) -> dict[str, str]:
    """String metadata; with ``--no_metadata`` only the minimum set plus modelspec.

    ``num_epochs`` is the run's epoch count computed from its steps (``--max_train_epochs`` may be unset).
    """
    base = "z_image" if arch_name == "zimage" else BASE_MODEL_VERSION[model_version]
    title = "Z-Image" if arch_name == "zimage" else ARCHITECTURE_TITLE[model_version]
    meta: dict[str, Any] = {"ss_base_model_version": base}
    if network:
        meta.update(ss_network_module=args.network_module, ss_network_dim=args.network_dim,
                    ss_network_alpha=args.network_alpha)
    if network and args.network_args:
        meta["ss_network_args"] = json.dumps(dict(a.split("=", 1) for a in args.network_args))
    if not getattr(args, "no_metadata", False):
        meta.update(
            ss_session_id=session_id,
            ss_training_started_at=started_at,
            ss_training_finished_at=time.time(),
            ss_output_name=args.output_name,
            ss_learning_rate=args.learning_rate,
            ss_lr_warmup_steps=args.lr_warmup_steps,
            ss_lr_scheduler=args.lr_scheduler,
            ss_max_grad_norm=args.max_grad_norm,
            ss_num_train_items=sum(len(d.items or ()) * d.num_repeats for d in datasets),
            ss_num_batches_per_epoch=num_batches_per_epoch,
            ss_num_epochs=num_epochs if num_epochs is not None else args.max_train_epochs,
            ss_max_train_steps=args.max_train_steps,
            ss_steps=steps,
            ss_epoch=epoch,
            ss_gradient_checkpointing=args.gradient_checkpointing,
            ss_gradient_checkpointing_cpu_offload=bool(getattr(args, "gradient_checkpointing_cpu_offload", False)),
            ss_gradient_accumulation_steps=args.gradient_accumulation_steps,
            ss_full_fp16=bool(getattr(args, "full_fp16", False)),
            ss_full_bf16=bool(getattr(args, "full_bf16", False)),
            ss_mixed_precision=args.mixed_precision,
            ss_seed=args.seed,
            ss_training_comment=getattr(args, "training_comment", None),
            ss_optimizer=optimizer_name,
            ss_fp8_base=bool(getattr(args, "fp8_base", False)),
            ss_timestep_sampling=args.timestep_sampling,
            ss_sigmoid_scale=args.sigmoid_scale,
            ss_discrete_flow_shift=args.discrete_flow_shift,
            ss_guidance_scale=args.guidance_scale,
            ss_weighting_scheme=args.weighting_scheme,
            ss_logit_mean=args.logit_mean,
            ss_logit_std=args.logit_std,
            ss_mode_scale=args.mode_scale,
            ss_datasets=_dataset_summary(datasets),
            **_model_keys(args),
        )
        if network:
            meta["ss_network_dropout"] = getattr(args, "network_dropout", None)
    arch_title = args.metadata_arch or title
    resolution = args.metadata_reso or ("1328x1328" if base == "qwen_image" else "1024x1024")
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch_title}/lora" if network else arch_title,
        "modelspec.implementation": IMPLEMENTATION[arch_name],
        "modelspec.title": args.metadata_title or args.output_name,
        "modelspec.resolution": str(resolution).replace(",", "x"),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    for key, value in (("author", args.metadata_author), ("description", args.metadata_description),
                       ("license", args.metadata_license), ("tags", args.metadata_tags)):
        if value:
            meta[f"modelspec.{key}"] = value
    if args.min_timestep is not None or args.max_timestep is not None:
        meta["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep or 1000}"
    # Musubi writes str(value) for every ss_* key, None included
    return {k: str(v) for k, v in meta.items() if v is not None or k.startswith("ss_")}
