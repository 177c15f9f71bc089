"""Post-hoc EMA of saved LoRA checkpoints (Musubi's ``lora_post_hoc_ema`` flags).

See ``docs/lora_tools.md``; the work is done by :func:`tsumugi.networks.lora_ema.post_hoc_ema`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:  # run as a file: import the package from src/, not src/tsumugi/
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import logging  # noqa: E402

from tsumugi.cli.entry import run_main  # noqa: E402
from tsumugi.cli.lora_tools_args import build_ema_parser  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: ema_main(argv))


if __name__ == "__main__":
    sys.exit(main())
