"""What the scripts say about flags that are accepted but do nothing, and what ``--help`` shows.

Every flag a script parses either works, is refused by name before any work starts
(:data:`tsumugi.train.run_setup.REFUSED_FLAGS`), or is listed in :data:`NO_OP_FLAGS` with the reason it
has no effect. The parsers (:class:`tsumugi.cli.common.UserErrorParser`) warn once for each such
flag given a non-default value, and :class:`HelpFormatter` makes ``--help`` say the same: no-op flags read
"no effect: <why>", refused flags end in "not supported yet; refused", other options show their default
and whether they are required.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger("tsumugi.flags")

_NO_WORKERS = "batches are small cache reads done in the training process (no DataLoader workers)"
_NO_DDP = ("tsumugi does not wrap the model in DistributedDataParallel: with several processes the "
           "trainable gradients are averaged by one all-reduce per optimizer step")
_HUNYUAN_VAE = "a HunyuanVideo VAE option; the Qwen-Image VAE encodes each image whole"
_CONSOLE = "a console option of Musubi's --debug_mode console; the preview here prints a text summary"

# dest -> why the flag has no effect (accepted so that Musubi Tuner commands and config files run unchanged)
NO_OP_FLAGS: dict[str, str] = {
    "disable_numpy_memmap": "weights are read tensor by tensor through safetensors' own reader, not numpy's memmap",
    "max_data_loader_n_workers": _NO_WORKERS,
    "persistent_data_loader_workers": _NO_WORKERS,
    "img_in_txt_in_offloading": "a HunyuanVideo option",
    "mem_eff_save": "checkpoints are always streamed to disk tensor by tensor",
    "ddp_gradient_as_bucket_view": _NO_DDP,
    "ddp_static_graph": _NO_DDP,
    "embedded_cfg_scale": "a HunyuanVideo option; --guidance_scale sets the guidance",
    "cpu_noise": "the initial noise is always drawn on the CPU",
    "console_width": _CONSOLE,
    "console_back": _CONSOLE,
    "console_num_images": _CONSOLE,
    "vae_tiling": _HUNYUAN_VAE,
    "vae_chunk_size": _HUNYUAN_VAE,
    "vae_spatial_tile_sample_min_size": _HUNYUAN_VAE,
}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=lambda s: (s.startswith("--") and "_" in s, len(s)))


def given_no_op_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[argparse.Action]:
    """The actions of ``parser`` in :data:`NO_OP_FLAGS` whose value in ``args`` is not the default."""
    return [a for a in parser._actions if a.dest in NO_OP_FLAGS and a.option_strings
            and getattr(args, a.dest, a.default) != a.default]


def warn_no_op_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, already: set[str]) -> None:
    """One warning per no-op flag given (``already`` holds the dests warned about, so a second parse of the
    same command line, as ``--config_file`` does, does not repeat them)."""
    for action in given_no_op_flags(parser, args):
        if action.dest not in already:
            already.add(action.dest)
            logger.warning("%s has no effect: %s", _flag(action), NO_OP_FLAGS[action.dest])


def refused_flags() -> dict[str, str]:
    from tsumugi.train.run_setup import REFUSED_FLAGS  # imported when help is shown, not at parse time

    return REFUSED_FLAGS


def _shown_default(value: Any) -> str | None:
    if value is None or value is False or value == [] or value == "" or value is argparse.SUPPRESS:
        return None
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def help_text(action: argparse.Action, refused: dict[str, str]) -> str | None:
    """The help line of ``action`` as ``--help`` shows it (before ``%`` formatting)."""
    help = action.help
    if help is argparse.SUPPRESS or not action.option_strings or action.dest == "help":
        return help
    if action.dest in NO_OP_FLAGS:
        return "no effect: " + NO_OP_FLAGS[action.dest].replace("%", "%%")
    help = help or ""
    if action.dest in refused:
        return (help + "; " if help else "") + "not supported yet; refused"
    lowered = help.lower()
    if action.required and "required" not in lowered:
        help += " (required)"
    default = _shown_default(action.default)
    if default is not None and "default" not in lowered:
        help += f" (default: {default.replace('%', '%%')})"
    return help.strip()


class HelpFormatter(argparse.HelpFormatter):
    """Help lines that state the default, ``required``, "no effect" or "refused" (see module docstring)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return help_text(action, refused_flags())
