"""Extract a LoRA from a base and a fine-tuned Qwen-Image / Z-Image DiT (Musubi's ``qwen_extract_lora`` flags).

See ``docs/lora_tools.md``; the work is done by :func:`tsumugi.networks.lora_extract.extract_lora`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import logging  # noqa: E402

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.cli.lora_tools_args import build_extract_parser  # noqa: E402

logger = logging.getLogger("tsumugi.qwen_extract_lora")


def extract_main(argv: list[str] | None = None) -> int:
    import torch

    from tsumugi.cli.lora_tools_args import parse_device
    from tsumugi.networks.lora_extract import extract_lora

    args = build_extract_parser().parse_args(argv)
    if args.mem_eff_safe_open:
        logger.info("--mem_eff_safe_open: weights are always read one tensor at a time")
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


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: extract_main(argv))


if __name__ == "__main__":
    sys.exit(main())
