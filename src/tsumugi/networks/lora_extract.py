"""Extracting a LoRA from two DiTs: ``delta = W_tuned - W_org`` per target Linear, truncated SVD.

For each Linear our LoRA networks train (:mod:`tsumugi.networks.lora_qwen_image`,
:mod:`tsumugi.networks.lora_zimage`, default excludes applied), ``delta = U S V^T`` (fp32, full SVD)
and the rank-``r`` factors are ``up = U[:, :r] * S[:r]``, ``down = V^T[:r]`` with ``alpha = r`` (scale 1),
``r = min(dim, out, in)``. With ``clamp_quantile < 1`` every entry of both factors is clamped to
``[-h, h]``, ``h`` the quantile of the absolute values of all their entries (Musubi takes the quantile of
the signed values; on the roughly symmetric factors the two agree, and ``1`` here means no clamping).

Streaming: only one weight of each checkpoint is in memory at a time (read through
:class:`~tsumugi.models.safetensors_io.SafetensorsSource`, converted from the ComfyUI layout key by key),
so two 20B checkpoints never need to fit at once. The target set comes from the DiT class built on the
meta device from the base checkpoint's config.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)


class DitWeights:
    """Read one DiT weight at a time by its diffusers name from any file layout :func:`detect` accepts."""

    def __init__(self, path: str | Path, flag: str):
        from tsumugi.models.components import KINDS
        from tsumugi.models.converters import converter
        from tsumugi.models.detect import detect

        self.flag = flag
        self.det = detect(path, "dit", flag=flag)
        det = self.det
        if det.kind is None or KINDS[det.kind].role != "dit":
            det.source.close()
            raise UserError(f"{flag}: {det.path} is {det.describe()}, expected a Qwen-Image or Z-Image DiT")
        if det.fp8_scaled:
            det.source.close()
            raise UserError(f"{flag}: {det.path} is an fp8_scaled checkpoint; use the bf16 (or fp16) file")
        self.kind = det.kind
        self._conv = converter(det.kind)
        convert = self._conv.looks_like_original(det.keymap)
        # diffusers key -> key of the component (prefix stripped) it is computed from
        self.origin: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for key, file_key in det.keymap.items():
            meta = {key: torch.empty(det.source.info(file_key).shape, device="meta")}
            for new_key, t in (self._conv.to_diffusers(meta) if convert else meta).items():
                self.origin[new_key] = key
                self.shapes[new_key] = tuple(t.shape)
        self._convert = convert
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None

    @property
    def label(self) -> str:
        return str(self.det.path)

    def config(self) -> dict:
        """Constructor config of the DiT (``config.json`` of a folder; else metadata + shapes)."""
        from tsumugi.models import configs
        from tsumugi.models.components import KINDS, init_kwargs

        if self.det.folder_config is not None:
            config = configs.clean_config(self.det.folder_config)
            return init_kwargs(self.kind, config) if KINDS[self.kind].library == "diffusers" else config
        explicit = configs.config_from_metadata(self.det.source.metadata, self.kind, f"{self.flag}: {self.label}")
        return configs.resolve_config(self.kind, self.shapes, explicit)

    def get(self, key: str) -> torch.Tensor:
        """The weight ``key`` (diffusers name) in fp32 on the CPU."""
        source_key = self.origin.get(key)
        if source_key is None:
            raise UserError(f"{self.flag}: {self.label} has no weight {key} (diffusers name)")
        if self._cached is None or self._cached[0] != source_key:
            tensor = self.det.source.get(self.det.keymap[source_key], torch.float32)
            self._cached = (source_key, self._conv.to_diffusers({source_key: tensor}) if self._convert
                            else {source_key: tensor})
        return self._cached[1][key]

    def close(self) -> None:
        self._cached = None
        self.det.source.close()


def clamp_threshold(factors: list[torch.Tensor], quantile: float) -> float:
    """The ``quantile`` (linear interpolation) of the absolute values of all entries of ``factors``."""
    values = torch.cat([f.detach().abs().flatten().float() for f in factors]).sort().values
    pos = quantile * (values.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, values.numel() - 1)
    return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))


def low_rank_factors(
    delta: torch.Tensor, rank: int, clamp_quantile: float = 0.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``delta`` (then clamped)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile < 1:
        h = clamp_threshold([up, down], clamp_quantile)
        up, down = up.clamp(-h, h), down.clamp(-h, h)
    return up, down


def extract_lora(
    model_org: str | Path,
    model_tuned: str | Path,
    save_to: str | Path,
    *,
    dim: int = 4,
    device: torch.device | str = "cpu",
    clamp_quantile: float = 0.99,
    save_dtype: torch.dtype = torch.float32,
    layout: str | None = None,
    metadata: bool = True,
) -> Path:
    """Write the LoRA (rank ``dim``) that turns ``model_org`` into (approximately) ``model_tuned``.

    ``layout``: a :mod:`tsumugi.networks.lora_save` layout (default: the architecture's).
    """
    from tqdm import tqdm

    from tsumugi.models.components import KINDS, instantiate
    from tsumugi.networks.lora import LoRANetwork, lora_name_for, select_targets
    from tsumugi.networks.lora_qwen_image import QWEN_IMAGE_TARGET
    from tsumugi.networks.lora_save import save_lora
    from tsumugi.networks.lora_zimage import ZIMAGE_TARGET

    save_to = Path(save_to)
    if dim < 1:
        raise UserError(f"--dim: expected a positive rank, got {dim}")
    if not (0 < clamp_quantile <= 1):
        raise UserError(f"--clamp_quantile: expected a number in (0, 1], got {clamp_quantile}")
    if save_to.is_dir():
        raise UserError(f"--save_to: {save_to} is a folder; give the file name to write")
    if not save_to.name.endswith(".safetensors"):
        raise UserError(f"--save_to: {save_to} must end in .safetensors")

    org = DitWeights(model_org, "--model_org")
    try:
        tuned = DitWeights(model_tuned, "--model_tuned")
    except BaseException:
        org.close()
        raise
    try:
        if org.kind != tuned.kind:
            raise UserError(
                f"--model_tuned: {tuned.label} is {KINDS[tuned.kind].with_article}, --model_org {org.label} "
                f"is {KINDS[org.kind].with_article}"
            )
        if save_to.resolve() in {f.resolve() for w in (org, tuned) for f in w.det.source.files}:
            raise UserError(f"--save_to: {save_to} is an input file; write the LoRA elsewhere")
        arch = KINDS[org.kind].arch
        spec = QWEN_IMAGE_TARGET if arch == "qwen_image" else ZIMAGE_TARGET
        try:
            meta_dit = instantiate(org.kind, org.config())
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"--model_org: cannot build {KINDS[org.kind].with_article} from {org.label}: {e}") from e
        targets = select_targets(meta_dit, spec, exclude_patterns=spec.default_exclude)
        # Check every target in both files before the first SVD: a wrong pair fails fast.
        dims = {}
        for path, linear in targets:
            key = f"{path}.weight"
            want = (linear.out_features, linear.in_features)
            for w in (org, tuned):
                if key not in w.shapes:
                    raise UserError(f"{w.flag}: {w.label} has no weight {key}")
                if w.shapes[key] != want:
                    raise UserError(
                        f"{w.flag}: {w.label}: {key} has shape {w.shapes[key]}, expected {want} (the shapes of "
                        "--model_org's config)"
                    )
            r = min(dim, *want)
            dims[lora_name_for(path)] = (r, float(r))
        network = LoRANetwork(meta_dit, spec, rank=dim, alpha=dim, exclude_patterns=spec.default_exclude,
                              module_dims=dims, device="cpu")
        device = torch.device(device)
        logger.info("extracting %d modules at rank %d on %s", len(targets), dim, device)
        norms = []
        with torch.no_grad():
            for m in tqdm(network.modules_list(), desc="extracting", unit="module"):
                key = f"{m.path}.weight"
                delta = tuned.get(key).to(device) - org.get(key).to(device)
                up, down = low_rank_factors(delta, m.rank, clamp_quantile)
                norms.append(float(torch.linalg.matrix_norm(delta)))
                m.lora_up.weight.copy_(up.cpu())
                m.lora_down.weight.copy_(down.cpu())
                del delta, up, down
    finally:
        org.close()
        tuned.close()
    if norms and max(norms) == 0:
        logger.warning("--model_tuned equals --model_org on every target module: the LoRA is all zeros")
    meta = None
    if metadata:
        meta = {
            "title": save_to.name.removesuffix(".safetensors"),
            "created_at": str(int(time.time())),
            "ss_network_module": f"networks.lora_{'qwen_image' if arch == 'qwen_image' else 'zimage'}",
            "ss_network_dim": str(dim),
            "ss_network_alpha": str(dim),
            "tsumugi.extracted_from": f"{Path(model_org).name} -> {Path(model_tuned).name}",
        }
    save_lora(network, save_to, layout, meta, save_dtype)
    logger.info("wrote %s (%d modules, rank %d)", save_to, len(network.loras), dim)
    return save_to
