"""Bodies of the four caching scripts; the entry files only pick the architecture."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from tsumugi.arch import get_architecture
from tsumugi.arch.base import Architecture
from tsumugi.cli.cache_args import build_cache_latents_parser, build_cache_text_parser
from tsumugi.data.config import DatasetConfig, load_dataset_config
from tsumugi.data.problems import short_list
from tsumugi.errors import UserError
from tsumugi.model_versions import resolve_model_version
from tsumugi.preflight.runs import check_caching

logger = logging.getLogger(__name__)


def _model_version(arch: Architecture, args: argparse.Namespace) -> str:
    version = resolve_model_version(args) if arch.name == "qwen_image" else "original"
    if version == "layered":
        raise UserError("--model_version layered: Qwen-Image-Layered caching is not supported yet")
    return version


def _setup(arch: Architecture, args: argparse.Namespace) -> tuple[str, str, list[DatasetConfig], torch.device]:
    version = _model_version(arch, args)
    arch_code = arch.cache_arch_code(version)
    datasets = load_dataset_config(args.dataset_config, args, architecture=arch_code)
    if args.disable_cudnn_backend:
        torch.backends.cudnn.enabled = False
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return version, arch_code, datasets, device


def _workers(args: argparse.Namespace) -> int:
    """``--num_workers``, default: one thread fewer than the CPU count."""
    return args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)


def _preview(datasets: list[DatasetConfig], args: argparse.Namespace) -> int:
    """``--debug_mode``: print the buckets and write a contact sheet next to the first cache folder."""
    from tsumugi.data.preview import summarize, write_contact_sheet

    print(summarize(datasets))
    if args.debug_mode != "console":
        sheet = write_contact_sheet(datasets, Path(datasets[0].cache_directory) / "tsumugi_buckets_preview.png")
        print(f"contact sheet: {sheet}")
    return 0


def _report(kind: str, report) -> None:
    logger.info(
        "%s caches: %d written, %d current and skipped, %d orphans removed, %d orphans kept",
        kind, len(report.written), len(report.skipped), len(report.removed), len(report.kept_orphans),
    )
    if report.not_caches:
        logger.warning(
            "left %d file(s) alone that are named like %s caches but are not caches: %s",
            len(report.not_caches), kind, short_list([str(p) for p in report.not_caches]),
        )


def cache_latents_main(arch_name: str, argv: list[str] | None = None) -> int:
    from tsumugi.caching.cache_files import cache_dtype
    from tsumugi.caching.fingerprint import model_identity
    from tsumugi.caching.latent_cache import cache_latents

    arch = get_architecture(arch_name)
    args = build_cache_latents_parser(arch).parse_args(argv)
    version, arch_code, datasets, device = _setup(arch, args)
    if args.debug_mode:
        return _preview(datasets, args)
    if not args.vae:
        raise UserError("--vae is required (the VAE file or folder)")
    if args.vae_dtype is not None:
        if arch.name == "qwen_image":
            raise UserError("--vae_dtype: not supported for Qwen-Image (the VAE runs in float32)")
        logger.warning("--vae_dtype is ignored: the Z-Image VAE always runs in float32")
    check_caching(arch.name, args, datasets, "vae")
    vae = arch.load_vae(args.vae, device=device)
    report = cache_latents(
        arch, arch_code, datasets, vae,
        vae_identity=model_identity(args.vae), model_version=version, batch_size=args.batch_size,
        num_workers=_workers(args), skip_existing=args.skip_existing, keep_cache=args.keep_cache,
        dtype=cache_dtype(arch.name, "latent", args.cache_dtype),
    )
    _report("latent", report)
    return 0


def cache_text_main(arch_name: str, argv: list[str] | None = None) -> int:
    from tsumugi.caching.cache_files import cache_dtype
    from tsumugi.caching.fingerprint import model_identity
    from tsumugi.caching.text_cache import cache_text_outputs

    arch = get_architecture(arch_name)
    args = build_cache_text_parser(arch).parse_args(argv)
    version, arch_code, datasets, device = _setup(arch, args)
    if args.debug_mode:
        return _preview(datasets, args)
    check_caching(arch.name, args, datasets, "text_encoder")
    from tsumugi.models.host_memory import default_dtype

    dtype = default_dtype(args.text_encoder, "text_encoder", arch.name, device, flag="--text_encoder")
    text_encoder = arch.load_text_encoder(args.text_encoder, dtype=dtype, device=device, fp8=args.fp8_text_encoder)
    identity = model_identity(args.text_encoder)
    if args.fp8_text_encoder:
        identity += ":fp8"
    report = cache_text_outputs(
        arch, arch_code, datasets, text_encoder, arch.load_tokenizer(args.tokenizer),
        encoder_identity=identity, model_version=version, device=device, batch_size=args.batch_size,
        num_workers=_workers(args), skip_existing=args.skip_existing, keep_cache=args.keep_cache,
        dtype=cache_dtype(arch.name, "text", args.cache_dtype),
    )
    _report("text-encoder", report)
    return 0
