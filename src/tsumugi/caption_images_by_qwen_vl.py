"""Caption a folder of images with Qwen2.5-VL (Musubi's ``caption_images_by_qwen_vl`` flags).

See ``docs/lora_tools.md``; the work is done by :mod:`tsumugi.text.captioning`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import logging  # noqa: E402

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.cli.lora_tools_args import build_caption_parser  # noqa: E402
from tsumugi.errors import UserError  # noqa: E402

logger = logging.getLogger("tsumugi.caption_images_by_qwen_vl")


def caption_main(argv: list[str] | None = None) -> int:
    from tsumugi.cli.lora_tools_args import parse_device
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
        logger.info("%d of %d images already have a caption and are skipped (--overwrite redoes them)",
                    skipped, len(job.images))
    if not job.todo:
        return 0
    device = parse_device(args.device)
    tokenizer = load_tokenizer("qwen_image")
    model = captioning.load_captioner(args.model_path, device=device, fp8=args.fp8_vl)
    count = captioning.caption_images(job, model, tokenizer, prompt=prompt, max_new_tokens=args.max_new_tokens,
                                      max_size=args.max_size)
    where = job.output_file if job.output_format == "jsonl" else (job.output_dir or "beside the images")
    logger.info("wrote %d captions (%s)", count, where)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: caption_main(argv))


if __name__ == "__main__":
    sys.exit(main())
