"""``merge_lora``, ``convert_lora``, ``qwen_extract_lora``, ``lora_post_hoc_ema`` and
``caption_images_by_qwen_vl``: parse the flags, check them, call the library (see ``docs/lora_tools.md``)."""

from __future__ import annotations

import logging

from tsumugi.cli.lora_tools_args import (
    build_caption_parser,
    build_convert_parser,
    build_ema_parser,
    build_extract_parser,
    build_merge_parser,
    parse_device,
)
from tsumugi.errors import UserError

_caption_log = logging.getLogger("tsumugi.caption_images_by_qwen_vl")


def _save_dtype(name: str | None):
    """``--save_dtype`` of ``merge_lora`` as a torch dtype (None: the DiT's)."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    return names[name] if name else None


def merge_main(argv: list[str] | None = None) -> int:
    args = build_merge_parser().parse_args(argv)
    if args.dit_in_channels is not None:
        logging.getLogger("tsumugi.merge_lora").warning("--dit_in_channels is a HunyuanVideo option of Musubi's merge_lora; ignored")
    from tsumugi.preflight.runs import check_merge

    check_merge(args.dit, args.lora_weight or [], args.lora_multiplier, args.save_merged_model,
                _save_dtype(args.save_dtype))
    from tsumugi.networks.lora_merge_file import merge_to_file

    merge_to_file(
        args.dit,
        args.lora_weight or [],
        args.lora_multiplier,
        args.save_merged_model,
        arch=args.architecture,
        device=parse_device(args.device),
        save_dtype=_save_dtype(args.save_dtype),
    )
    return 0


def convert_main(argv: list[str] | None = None) -> int:
    from tsumugi.networks.lora_convert import DEFAULT_DIFFUSERS_PREFIX, convert_lora_file
    from tsumugi.preflight.runs import check_convert

    args = build_convert_parser().parse_args(argv)
    check_convert(args.input, args.output)
    prefix = args.diffusers_prefix
    if prefix == "-":
        prefix = None
    elif prefix is None:
        prefix = DEFAULT_DIFFUSERS_PREFIX
    else:
        prefix = prefix.rstrip(".")
    convert_lora_file(
        args.input,
        args.output,
        args.target,
        diffusers_prefix=prefix,
        arch=args.architecture,
        keep_alpha=args.keep_alpha,
        adapter_name=args.diffusers_adapter_name,
    )
    return 0


def extract_main(argv: list[str] | None = None) -> int:
    import torch

    from tsumugi.networks.lora_extract import extract_lora

    args = build_extract_parser().parse_args(argv)
    if args.mem_eff_safe_open:
        logging.getLogger("tsumugi.qwen_extract_lora").info("--mem_eff_safe_open: weights are always read one tensor at a time")
    dtypes = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
              "bf16": torch.bfloat16}
    layout = None if args.lora_format in ("default", "comfyui") else args.lora_format  # None: the family's
    extract_lora(
        args.model_org,
        args.model_tuned,
        args.save_to,
        dim=args.dim,
        device=parse_device(args.device, "cpu"),
        clamp_quantile=args.clamp_quantile,
        save_dtype=dtypes[args.save_precision],
        layout=layout,
        metadata=not args.no_metadata,
    )
    return 0


def ema_main(argv: list[str] | None = None) -> int:
    from tsumugi.networks.lora_ema import post_hoc_ema

    parser = build_ema_parser()
    args = parser.parse_args(argv)
    if args.sigma_rel is not None and (args.beta != parser.get_default("beta") or args.beta2 is not None):
        logging.getLogger("tsumugi.lora_post_hoc_ema").warning("--sigma_rel given: --beta/--beta2 are ignored")
    post_hoc_ema(
        args.path,
        args.output_file,
        beta=args.beta,
        beta2=args.beta2,
        sigma_rel=args.sigma_rel,
        sort_by=None if args.no_sort else args.sort_by,
    )
    return 0


def caption_main(argv: list[str] | None = None) -> int:
    from tsumugi.text import captioning
    from tsumugi.text.tokenizers import load_tokenizer

    args = build_caption_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens: expected a positive number, got {args.max_new_tokens}")
    if args.max_size < 256:
        raise UserError(f"--max_size: expected at least 256 (the smallest area is 256*28*28), got {args.max_size}")
    prompt = captioning.DEFAULT_PROMPT if args.prompt is None else args.prompt.replace("\\n", "\n")
    if not prompt.strip():
        raise UserError("--prompt is empty")
    job = captioning.plan_captions(args.image_dir, args.output_format, args.output_file, args.output_dir,
                                   overwrite=args.overwrite)
    skipped = len(job.images) - len(job.todo)
    if skipped:
        _caption_log.info("%d of %d images already have a caption and are skipped (--overwrite redoes them)",
                    skipped, len(job.images))
    if not job.todo:
        return 0
    device = parse_device(args.device)
    tokenizer = load_tokenizer("qwen_image")
    model = captioning.load_captioner(args.model_path, device=device, fp8=args.fp8_vl)
    count = captioning.caption_images(job, model, tokenizer, prompt=prompt, max_new_tokens=args.max_new_tokens,
                                      max_size=args.max_size)
    where = job.output_file if job.output_format == "jsonl" else (job.output_dir or "beside the images")
    _caption_log.info("wrote %d captions (%s)", count, where)
    return 0
