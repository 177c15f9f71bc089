"""Tokenizers of the two text encoders, bundled as package data.

Both families use the Qwen byte-level BPE (one shared ``vocab.json``/``merges.txt`` in
``assets/tokenizers/qwen_bpe``); they differ only in their added tokens and chat template:

* ``qwen_image`` -> ``assets/tokenizers/qwen2_5_vl``: the Qwen2.5-VL tokenizer of the Qwen-Image release
  (22 added tokens, ids 151643..151664).
* ``zimage`` -> ``assets/tokenizers/qwen3``: the Qwen3 tokenizer of the Z-Image release (26 added tokens,
  ids 151643..151668, chat template with ``enable_thinking``).

The fast tokenizer is built from vocab + merges at load time (no ``tokenizer.json`` is shipped); that takes
about half a second. The bundled tokenizers never touch the network. ``override`` (the ``--tokenizer`` flag)
may name a local tokenizer folder, or a Hugging Face Hub id -- only then is the Hub contacted.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from tsumugi.errors import UserError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizers"
BPE_DIR = ASSET_DIR / "qwen_bpe"

ARCH_TOKENIZER_DIRS = {"qwen_image": "qwen2_5_vl", "zimage": "qwen3"}
"""Architecture name -> bundled tokenizer folder under ``assets/tokenizers``."""

# Tokens every Qwen2.5/Qwen3 tokenizer must map to these ids; the prompt templates rely on them.
_REQUIRED_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*$")


def load_tokenizer(arch: str, override: str | None = None) -> Any:
    """Return the tokenizer of ``arch`` (``"qwen_image"`` or ``"zimage"``), cached per process.

    ``override``: ``None`` loads the bundled tokenizer offline. A path to an existing directory loads a local
    tokenizer folder (``tokenizer_config.json`` plus ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``;
    a model folder with a ``tokenizer/`` sub-folder also works). Anything else of the form ``owner/name`` or
    ``owner/name/sub/folder`` is a Hugging Face Hub id and is downloaded; without a sub-folder the repository
    root is tried first, then its ``tokenizer`` sub-folder.

    The returned object is shared by all callers with the same arguments: do not mutate it.
    """
    if arch not in ARCH_TOKENIZER_DIRS:
        raise ValueError(
            f"unknown architecture {arch!r} for a tokenizer; expected one of {sorted(ARCH_TOKENIZER_DIRS)}"
        )
    if override is None or override == "":
        return _load_bundled(arch)
    path = Path(os.path.expanduser(override))
    if path.exists():
        return _load_local(arch, str(_local_tokenizer_dir(override, path).resolve()))
    hub = parse_hub_id(override)
    # "models/tokenizer" with an existing "models" folder is a mistyped local path, not a Hub id.
    if hub is None or Path(override.split("/")[0]).is_dir():
        raise UserError(
            f"--tokenizer {override}: no such directory (and not a Hugging Face Hub id 'owner/name')"
        )
    return _load_hub(arch, *hub)


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """Split ``owner/name[/sub/folder]`` into (repo id, sub-folder); ``None`` if ``value`` is no Hub id."""
    if value.startswith((".", "/", "~")) or "\\" in value or "//" in value or not _HUB_ID.match(value):
        return None
    parts = value.split("/")
    if any(p in (".", "..") for p in parts):
        return None
    repo_id = "/".join(parts[:2])
    subfolder = "/".join(parts[2:]) or None
    return repo_id, subfolder


def clear_tokenizer_cache() -> None:
    """Forget every tokenizer loaded in this process (tests, or after editing a local folder)."""
    _load_bundled.cache_clear()
    _load_local.cache_clear()
    _load_hub.cache_clear()


# ---- loaders -------------------------------------------------------------------------------------


@functools.cache
def _load_bundled(arch: str) -> Any:
    from transformers import Qwen2Tokenizer

    folder = ASSET_DIR / ARCH_TOKENIZER_DIRS[arch]
    tokenizer = Qwen2Tokenizer.from_pretrained(
        str(folder),
        vocab_file=str(BPE_DIR / "vocab.json"),
        merges_file=str(BPE_DIR / "merges.txt"),
        local_files_only=True,
    )
    _check_tokenizer(tokenizer, arch, f"bundled tokenizer {folder}")
    return tokenizer


@functools.cache
def _load_local(arch: str, folder: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/... for broken folders
        raise UserError(f"--tokenizer {folder}: cannot load a tokenizer from this folder ({e})") from e
    _check_tokenizer(tokenizer, arch, f"--tokenizer {folder}")
    return tokenizer


@functools.cache
def _load_hub(arch: str, repo_id: str, subfolder: str | None) -> Any:
    from transformers import AutoTokenizer

    attempts = [subfolder] if subfolder is not None else ["", "tokenizer"]
    errors = []
    for sub in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(repo_id, subfolder=sub)
        except Exception as e:  # network, missing repo or missing files
            errors.append(f"{repo_id}{'/' + sub if sub else ''}: {e}")
            continue
        _check_tokenizer(tokenizer, arch, f"--tokenizer {repo_id}{'/' + sub if sub else ''}")
        return tokenizer
    raise UserError(
        f"--tokenizer {repo_id}{'/' + subfolder if subfolder else ''}: not a local directory, and loading it "
        f"as a Hugging Face Hub id failed: " + " | ".join(errors)
    )


def _local_tokenizer_dir(override: str, path: Path) -> Path:
    """The folder holding the tokenizer files: ``path`` itself or its ``tokenizer/`` sub-folder."""
    if not path.is_dir():
        raise UserError(f"--tokenizer {override}: expected a tokenizer directory, found a file")
    if (
        not (path / "tokenizer_config.json").is_file()
        and (path / "tokenizer" / "tokenizer_config.json").is_file()
    ):
        path = path / "tokenizer"
    has = {
        name: (path / name).is_file()
        for name in ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt")
    }
    missing = [] if has["tokenizer_config.json"] else ["tokenizer_config.json"]
    if not (has["tokenizer.json"] or (has["vocab.json"] and has["merges.txt"])):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise UserError(
            f"--tokenizer {override}: folder {path} is missing {', '.join(missing)}; expected a tokenizer folder "
            "such as the 'tokenizer' folder of the Qwen-Image or Z-Image release"
        )
    return path


def _check_tokenizer(tokenizer: Any, arch: str, source: str) -> None:
    """Reject tokenizers the prompt templates cannot work with (wrong family, missing chat template)."""
    for token, expected in _REQUIRED_TOKENS.items():
        found = tokenizer.convert_tokens_to_ids(token)
        if found != expected:
            raise UserError(
                f"{source}: token {token} has id {found}, expected {expected}; this is not a Qwen2.5/Qwen3 tokenizer"
            )
    if arch == "zimage" and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{source}: the Z-Image tokenizer needs a chat template (the Qwen3 one), found none")
