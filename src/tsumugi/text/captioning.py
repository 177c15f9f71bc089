"""Captioning images with Qwen2.5-VL (``caption_images_by_qwen_vl``).

The model is the Qwen-Image text-encoder file, loaded whole (vision tower and ``lm_head`` included) as
transformers' ``Qwen2_5_VLForConditionalGeneration``; its tokenizer is the bundled one. Each image gets
one chat turn, ``[image, prompt]`` (the Qwen2.5-VL chat template, default system prompt), and greedy
decoding up to ``max_new_tokens`` stopping at ``<|im_end|>`` / ``<|endoftext|>``.

Image size (Musubi's net effect): the image is resized, aspect kept and sides multiples of 28, to an area
within ``[256 * 28 * 28, max_size * 28 * 28]`` pixels (``--max_size 1280``: about 1000 x 1000) by
:func:`tsumugi.text.qwen_vl_images.preprocess_qwen_vl_images`, which gives the tensors transformers'
``Qwen2VLImageProcessor`` gives for the same bounds.

Outputs: ``<stem>.txt`` per image (beside it or in ``output_dir``), or one JSONL file of
``{"image_path": <absolute path>, "caption": ...}`` lines, the form a dataset's ``image_jsonl_file`` reads.
Every write is atomic (temporary name, then rename), after each image, so an interrupted run keeps what it
finished; images that already have a caption are skipped unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_FACTOR = 28
MIN_PIXELS = 256 * IMAGE_FACTOR * IMAGE_FACTOR
DEFAULT_MAX_SIZE = 1280
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_PROMPT_NAME = "a built-in instruction asking for a detailed natural-language caption"
DEFAULT_PROMPT = (
    "# Image captioning\n"
    "Describe the input image for a text-to-image training caption.\n"
    "1. Use plain, natural sentences; no lists, headings or markup.\n"
    "2. Cover the subjects and their attributes, how they relate to each other, and the setting.\n"
    "3. Quote any visible text exactly as written, without translating or explaining it.\n"
    "4. Describe only what is visible; do not guess or generalise."
)
IMAGE_PAD = "<|image_pad|>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
OUTPUT_FORMATS = ("jsonl", "text")


@dataclass
class CaptionJob:
    """What to caption and where the captions go (checked by :func:`plan_captions`)."""

    images: list[Path]
    todo: list[Path]
    output_format: str
    output_file: Path | None
    output_dir: Path | None
    existing: dict[str, str]
    """JSONL entries already in ``output_file`` (image path -> caption), kept in the rewritten file."""

    def text_path(self, image: Path) -> Path:
        return (self.output_dir or image.parent) / f"{image.stem}.txt"


def _read_jsonl(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--output_file: {path} cannot be read ({e})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--output_file: {path} line {lineno} is not valid JSON ({e.msg}); fix or move it") from None
        if not isinstance(record, dict) or not isinstance(record.get("image_path"), str) \
                or not isinstance(record.get("caption"), str):
            raise UserError(f"--output_file: {path} line {lineno} is not an {{image_path, caption}} object")
        entries[record["image_path"]] = record["caption"]
    return entries


def plan_captions(
    image_dir: str | Path,
    output_format: str = "jsonl",
    output_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> CaptionJob:
    """Check the paths and list the images to caption (no model needed)."""
    from tsumugi.data.images import probe_image
    from tsumugi.data.items import list_image_files

    folder = Path(image_dir)
    if not folder.is_dir():
        raise UserError(f"--image_dir: {folder} is not a folder")
    if output_format not in OUTPUT_FORMATS:
        raise UserError(f"--output_format: expected one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    out_file = Path(output_file) if output_file else None
    out_dir = Path(output_dir) if output_dir else None
    if output_format == "jsonl":
        if out_file is None:
            raise UserError("--output_file is required with --output_format jsonl")
        if out_dir is not None:
            raise UserError("--output_dir applies to --output_format text; with jsonl give --output_file only")
        if out_file.is_dir():
            raise UserError(f"--output_file: {out_file} is a folder; give the JSONL file to write")
    else:
        if out_file is not None:
            raise UserError("--output_file applies to --output_format jsonl; with text use --output_dir (or nothing)")
        if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--output_dir: {out_dir} exists and is not a folder")
    images = [p.resolve() for p in list_image_files(folder)]
    if not images:
        raise UserError(f"--image_dir: {folder} holds no images")
    for image in images:  # headers only: a broken file fails here, before the model is loaded
        probe_image(image, decode=False)
    if output_format == "text":
        seen: dict[Path, Path] = {}
        for image in images:
            other = seen.setdefault(CaptionJob([], [], output_format, None, out_dir, {}).text_path(image), image)
            if other != image:
                raise UserError(f"--image_dir: {other.name} and {image.name} would share the caption file "
                                f"{other.stem}.txt; rename one")
    existing = _read_jsonl(out_file) if out_file is not None and out_file.is_file() else {}
    job = CaptionJob(images, [], output_format, out_file, out_dir, existing)
    if overwrite:
        job.todo = list(images)
    elif output_format == "jsonl":
        job.todo = [p for p in images if str(p) not in existing]
    else:
        job.todo = [p for p in images if not job.text_path(p).exists()]
    return job


def load_captioner(
    model_path: str | Path, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
    flag: str = "--model_path",
) -> torch.nn.Module:
    """Qwen2_5_VLForConditionalGeneration from a Qwen2.5-VL file that holds the vision tower and ``lm_head``
    (``flag``: the option errors name)."""
    from tsumugi.models.detect import detect
    from tsumugi.models.loader import load_text_encoder

    det = detect(model_path, "text_encoder", flag=flag)
    with det.source:
        keys = set(det.keymap)
        described = det.describe()
    if det.kind != "qwen2_5_vl":
        raise UserError(f"{flag}: {det.path} is {described}, expected a Qwen2.5-VL model")
    missing = []
    if not any(k.startswith(("visual.", "model.visual.")) for k in keys):
        missing.append("the vision tower (visual.* weights)")
    folder_config = det.folder_config or {}
    tied = (folder_config.get("text_config") or {}).get("tie_word_embeddings", folder_config.get("tie_word_embeddings"))
    if "lm_head.weight" not in keys and not tied:  # a folder whose config ties the head to the embeddings is whole
        missing.append("the language head (lm_head.weight)")
    if missing:
        raise UserError(
            f"{flag}: {det.path} lacks {' and '.join(missing)}; captioning needs the full Qwen2.5-VL "
            "(e.g. ComfyUI's qwen_2.5_vl_7b.safetensors or the Qwen-Image text_encoder folder)"
        )
    model = load_text_encoder(model_path, "qwen_image", flag=flag, dtype=dtype, device=device)
    if fp8:
        from tsumugi.memory.fp8_linear import quantize_linears_fp8

        count = quantize_linears_fp8(model)
        logger.info("--fp8_vl: %d Linear weights stored in float8", count)
    return model.eval()


def _vision_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    vision = model.config.vision_config
    return int(vision.patch_size), int(vision.spatial_merge_size), int(vision.temporal_patch_size)


def caption_inputs(
    model: torch.nn.Module, tokenizer: Any, image: Any, prompt: str, max_size: int = DEFAULT_MAX_SIZE
) -> dict[str, torch.Tensor]:
    """``generate`` inputs of one image and prompt: chat text with the image's pad tokens, pixel patches."""
    from tsumugi.text.qwen_vl_images import preprocess_qwen_vl_images

    if IMAGE_PAD in prompt:
        raise UserError(f"--prompt contains {IMAGE_PAD}, which is reserved for the image placeholder")
    patch, merge, temporal = _vision_geometry(model)
    vision = preprocess_qwen_vl_images(
        [image], min_pixels=MIN_PIXELS, max_pixels=max_size * IMAGE_FACTOR * IMAGE_FACTOR,
        patch_size=patch, merge_size=merge, temporal_patch_size=temporal,
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace(IMAGE_PAD, IMAGE_PAD * vision.num_image_tokens[0])
    encoded = tokenizer([text], return_tensors="pt")
    input_ids = encoded["input_ids"]
    return {
        "input_ids": input_ids,
        "attention_mask": encoded["attention_mask"],
        "pixel_values": vision.pixel_values,
        "image_grid_thw": vision.image_grid_thw,
        "mm_token_type_ids": (input_ids == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).long(),
    }


@torch.no_grad()
def caption_token_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    image: Any,
    prompt: str = DEFAULT_PROMPT,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_size: int = DEFAULT_MAX_SIZE,
) -> list[int]:
    """The generated token ids (greedy, prompt excluded) for one image."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in caption_inputs(model, tokenizer, image, prompt, max_size).items()}
    stop = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                         pad_token_id=stop[-1])
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def decode_caption(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


def _write_jsonl(path: Path, entries: dict[str, str]) -> None:
    from tsumugi.models.safetensors_write import write_text_atomic

    lines = [json.dumps({"image_path": p, "caption": c}, ensure_ascii=False) for p, c in entries.items()]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def caption_images(
    job: CaptionJob,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_size: int = DEFAULT_MAX_SIZE,
) -> int:
    """Caption ``job.todo`` and write each caption as soon as it is made; returns the number written."""
    from tqdm import tqdm

    from tsumugi.data.images import load_image
    from tsumugi.models.safetensors_write import write_text_atomic

    entries = dict(job.existing)
    done = 0
    for image_path in tqdm(job.todo, desc="captioning", unit="image"):
        image = load_image(image_path)
        ids = caption_token_ids(model, tokenizer, image, prompt, max_new_tokens=max_new_tokens, max_size=max_size)
        caption = decode_caption(tokenizer, ids)
        if job.output_format == "jsonl":
            assert job.output_file is not None
            entries[str(image_path)] = caption
            _write_jsonl(job.output_file, entries)
        else:
            write_text_atomic(job.text_path(image_path), caption)
        done += 1
    return done
