"""A LoRA network that adapts the Linear layers of any DiT.

Design
------
The trainable weights never live inside the DiT. Each adapted ``nn.Linear`` keeps its module, its
parameters and its place in the model; the network only replaces the Linear's ``forward`` by a
wrapper (:meth:`LoRAModule.apply_to`, undone by :meth:`LoRAModule.remove`). The LoRA factors sit in the
network's own ``ModuleDict``, so

- block swap can move the base weights of a block between devices without touching LoRA weights,
  which stay resident wherever the network was moved to;
- fp8 base weights compose: the wrapper calls whatever ``forward`` the Linear had when the network
  was applied (plain, or an fp8-dequantizing patch), then adds the low-rank term computed from the
  same input. Quantize/patch the DiT first, apply the network second.

Math (``docs/design.md``, "LoRA files")::

    y = base(x) + m * (alpha / r) * up(dropout(down(x)))

``down`` (``(r, in)``, Kaiming-uniform with a = sqrt(5)) and ``up`` (``(out, r)``, zeros) are fp32. The
input is cast to the LoRA dtype unless autocast is active; base output and low-rank term are summed
in the LoRA dtype and cast once to the base output dtype. Neuron dropout acts on ``down(x)``, rank
dropout keeps each rank with probability 1 - p per sample (scale multiplied by 1 / (1 - p)), module
dropout skips the whole low-rank term for a forward with probability p; all three only in training
mode (``network.train()``).

Module names follow kohya/Musubi: ``lora_unet_`` + the dotted module path with dots replaced by
underscores. The architecture-specific target sets are in ``lora_qwen_image`` and ``lora_zimage``,
the flag parsing and ``create_network`` factories in ``lora_factory``; files are written by
``lora_save`` and read by ``lora_files``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tsumugi.counts import format_count
from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

LORA_PREFIX = "lora_unet_"


def lora_name_for(path: str) -> str:
    """Musubi module name of a dotted DiT path: ``layers.0.attention.to_q`` -> ``lora_unet_layers_0_attention_to_q``."""
    return LORA_PREFIX + path.replace(".", "_")


def file_name_to_lora_name(name: str) -> str:
    """A module name as read from a file (kohya or dotted, prefix removed) in Musubi form."""
    return name if name.startswith(LORA_PREFIX) else lora_name_for(name)


@dataclass(frozen=True)
class TargetSpec:
    """Which Linears of a DiT an architecture adapts.

    ``container_classes``: class names of the blocks whose Linears are candidates; ``default_exclude``:
    regexes appended to the user's exclude patterns (full-matched against dotted paths);
    ``default_layout``: the file layout ``lora_save`` writes unless told otherwise.
    """

    name: str
    container_classes: tuple[str, ...]
    default_exclude: tuple[str, ...] = ()
    default_layout: str = "musubi"
    display_name: str = ""
    """the family's name in messages (``Qwen-Image``, ``Z-Image``); ``name`` when empty"""

    def __post_init__(self) -> None:
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)


# ---------------------------------------------------------------------------------------------------
# Target selection


def compile_patterns(patterns: Iterable[str], what: str) -> list[re.Pattern[str]]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise UserError(
                f"--network_args {what}: {p!r} is not a valid regular expression ({exc})"
            ) from None
    return compiled


def select_targets(
    dit: nn.Module,
    spec: TargetSpec,
    include_patterns: Sequence[str] = (),
    exclude_patterns: Sequence[str] = (),
) -> list[tuple[str, nn.Linear]]:
    """``(dotted_path, linear)`` for every Linear inside a container of ``spec``, in model order.

    A module is skipped when an exclude pattern full-matches its dotted path and no include pattern
    does (include only re-admits excluded modules; it does not restrict anything by itself).
    ``exclude_patterns`` is taken as given: callers add ``spec.default_exclude`` themselves.
    """
    include = compile_patterns(include_patterns, "include_patterns")
    exclude = compile_patterns(exclude_patterns, "exclude_patterns")
    targets: list[tuple[str, nn.Linear]] = []
    seen: set[str] = set()
    for container_name, container in dit.named_modules():
        if type(container).__name__ not in spec.container_classes:
            continue
        for child_name, child in container.named_modules():
            if not isinstance(child, nn.Linear) or not child_name:
                continue
            path = f"{container_name}.{child_name}" if container_name else child_name
            if any(p.fullmatch(path) for p in exclude) and not any(p.fullmatch(path) for p in include):
                continue
            name = lora_name_for(path)
            if name in seen:
                # nested containers list the same Linear twice; different paths collapsing to one
                # underscore name would make the file ambiguous
                if any(t[0] == path for t in targets):
                    continue
                raise ValueError(f"two DiT modules map to the same LoRA name {name}")
            seen.add(name)
            targets.append((path, child))
    return targets


# ---------------------------------------------------------------------------------------------------
# One adapted Linear


class LoRAModule(nn.Module):
    """Low-rank update of one Linear; holds only a (non-registered) reference to that Linear."""

    def __init__(
        self,
        path: str,
        base: nn.Linear,
        rank: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{path}: LoRA supports nn.Linear only, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"{path}: rank must be >= 1, got {rank}")
        self.path = path
        self.lora_name = lora_name_for(path)
        self.rank = int(rank)
        alpha = float(self.rank) if alpha is None or alpha == 0 else float(alpha)
        self.lora_down = nn.Linear(base.in_features, self.rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(self.rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        self.scale = alpha / self.rank
        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        # Plain attributes (a list hides the Linear from nn.Module registration): the base stays
        # owned by the DiT and out of this module's parameters, state dict and .to().
        self._base = [base]
        self._org_forward: Any = None
        self._instance_forward: Any = None

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the base Linear's calls through :meth:`forward` (keeps whatever forward it had)."""
        if self.applied:
            return
        base = self.base
        self._instance_forward = base.__dict__.get("forward")
        self._org_forward = base.forward
        base.forward = self.forward

    def remove(self) -> None:
        """Give the base Linear its original forward back."""
        if not self.applied:
            return
        base = self.base
        if self._instance_forward is None:
            base.__dict__.pop("forward", None)
        else:
            base.forward = self._instance_forward
        self._org_forward = None
        self._instance_forward = None

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))
        self.scale = float(alpha) / self.rank

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """``m * (alpha / r) * up(dropouts(down(x)))`` in the LoRA dtype (or the autocast dtype)."""
        down = self.lora_down.weight
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        h = F.linear(x, down)
        scale = self.scale * self.multiplier
        if self.training:
            if self.dropout:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout:
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
                keep = torch.rand(shape, device=h.device) > self.rank_dropout
                h = h * keep.to(h.dtype)
                scale = scale / (1.0 - self.rank_dropout)
        return F.linear(h * scale, self.lora_up.weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._org_forward is None:
            raise RuntimeError(f"{self.lora_name}: LoRA module called before apply_to()")
        base_out = self._org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return base_out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return base_out
        delta = self.lora_output(x)
        if delta.dtype == base_out.dtype:
            return base_out + delta
        return (base_out.to(delta.dtype) + delta).to(base_out.dtype)

    def delta_weight(
        self, dtype: torch.dtype = torch.float32, multiplier: float | None = None
    ) -> torch.Tensor:
        """``m * (alpha / r) * up @ down`` as a dense ``(out, in)`` matrix."""
        m = self.multiplier if multiplier is None else multiplier
        return (self.lora_up.weight.to(dtype) @ self.lora_down.weight.to(dtype)) * (self.scale * m)


# ---------------------------------------------------------------------------------------------------
# The network


@dataclass
class LoadReport:
    """Outcome of :meth:`LoRANetwork.load_weights`: names are Musubi-style ``lora_unet_...``."""

    loaded: list[str] = field(default_factory=list)
    unmatched_in_file: list[str] = field(default_factory=list)
    missing_from_file: list[str] = field(default_factory=list)
    rescaled: list[str] = field(default_factory=list)


class LoRANetwork(nn.Module):
    """LoRA modules for the selected Linears of ``dit``; the DiT itself is only wrapped, never modified.

    ``rank``/``alpha`` apply to every module unless ``module_dims`` (``{lora_name: (rank, alpha)}``, e.g.
    from :func:`tsumugi.networks.lora_factory.module_dims_from_file`) is given: then exactly the targets
    named there are created, each with its own rank and alpha. ``include_patterns``/``exclude_patterns``
    are used as given (the architecture factories add their default excludes). Call :meth:`apply_to` to
    activate.
    """

    def __init__(
        self,
        dit: nn.Module,
        target_spec: TargetSpec,
        rank: int = 4,
        alpha: float | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        multiplier: float = 1.0,
        include_patterns: Sequence[str] = (),
        exclude_patterns: Sequence[str] = (),
        *,
        module_dims: dict[str, tuple[int, float | None]] | None = None,
        loraplus_lr_ratio: float | None = None,
        verbose: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.target_spec = target_spec
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.multiplier = float(multiplier)
        self.loras = nn.ModuleDict()
        targets = select_targets(dit, target_spec, include_patterns, exclude_patterns)
        for path, linear in targets:
            name = lora_name_for(path)
            if module_dims is not None:
                if name not in module_dims:
                    continue
                r, a = module_dims[name]
            else:
                r, a = rank, alpha
            self.loras[name] = LoRAModule(
                path,
                linear,
                r,
                a,
                multiplier=multiplier,
                dropout=dropout,
                rank_dropout=rank_dropout,
                module_dropout=module_dropout,
                device=device,
            )
        if module_dims is not None:
            unknown = sorted(set(module_dims) - set(self.loras.keys()))
            if unknown:
                shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
                logger.warning(
                    "%d modules of the weights file are not %s LoRA targets and are ignored: %s",
                    len(unknown),
                    target_spec.display_name,
                    shown,
                )
        if not self.loras:
            raise UserError(
                f"the LoRA network for {target_spec.display_name} has no modules: "
                "check --network_args exclude_patterns/include_patterns (or the --network_weights file)"
            )
        n_params = sum(p.numel() for p in self.parameters())
        logger.info("LoRA for %s: %d modules, %s parameters", target_spec.display_name, len(self.loras),
                    format_count(n_params))
        if verbose:
            for m in self.loras.values():
                logger.info("  %s: rank %d, alpha %g", m.path, m.rank, float(m.alpha))

    # -- activation ----------------------------------------------------------------------------------

    def modules_list(self) -> list[LoRAModule]:
        return list(self.loras.values())  # type: ignore[arg-type]

    def apply_to(self) -> None:
        """Wrap every target Linear's forward (idempotent)."""
        for m in self.modules_list():
            m.apply_to()

    def remove(self) -> None:
        """Restore every target Linear's forward (idempotent)."""
        for m in self.modules_list():
            m.remove()

    @property
    def applied(self) -> bool:
        return any(m.applied for m in self.modules_list())

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for m in self.modules_list():
            m.multiplier = self.multiplier

    # -- optimizer -----------------------------------------------------------------------------------

    def prepare_optimizer_params(
        self, lr: float, loraplus_lr_ratio: float | None = None
    ) -> list[dict[str, Any]]:
        """Optimizer param groups; with LoRA+ the ``lora_up`` weights get their own group at ``lr * ratio``.

        Each group carries a ``name`` (``unet``, ``unet plus``) for logging as ``lr/<name>``.
        """
        ratio = self.loraplus_lr_ratio if loraplus_lr_ratio is None else loraplus_lr_ratio
        if not ratio:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr, "name": "unet"}]
        plain, plus = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (plus if ".lora_up." in name else plain).append(p)
        groups = []
        if plain:
            groups.append({"params": plain, "lr": lr, "name": "unet"})
        if plus:
            groups.append({"params": plus, "lr": lr * ratio, "name": "unet plus"})
        return groups

    # -- weights -------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, path: str | Path, flag: str = "--network_weights") -> LoadReport:
        """Load factors from a LoRA file in any layout ``lora_files`` reads (non-strict).

        Modules of the file that this network lacks, and modules of the network the file lacks, are
        reported (and logged) rather than fatal. A rank mismatch is an error (the message points to
        ``--dim_from_weights``). When the file's alpha differs from the module's, the factors are
        rescaled so that the file's update ``(alpha_file / r) * up @ down`` is reproduced exactly under
        the network's alpha (Musubi loads them unscaled, changing the update).
        """
        from tsumugi.networks.lora_files import read_lora_file

        report = LoadReport()
        by_name = dict(self.loras.items())
        for module in read_lora_file(path, flag=flag):
            name = file_name_to_lora_name(module.name)
            target = by_name.get(name)
            if target is None:
                report.unmatched_in_file.append(module.name)
                continue
            down_shape = tuple(target.lora_down.weight.shape)
            up_shape = tuple(target.lora_up.weight.shape)
            if tuple(module.down.shape) != down_shape or tuple(module.up.shape) != up_shape:
                raise UserError(
                    f"{flag}: {Path(path).name}: module {module.name} has down/up shapes "
                    f"{tuple(module.down.shape)}/{tuple(module.up.shape)}, the network expects "
                    f"{down_shape}/{up_shape} (rank {target.rank}); use --dim_from_weights to take the rank "
                    "from the file"
                )
            file_scale = 1.0 if module.alpha is None else module.alpha / module.rank
            down = module.down.to(target.lora_down.weight.dtype)
            up = module.up.to(target.lora_up.weight.dtype)
            if not math.isclose(file_scale, target.scale, rel_tol=1e-6):
                ratio = file_scale / target.scale
                root = math.sqrt(abs(ratio))
                down = down * root
                up = up * (root if ratio >= 0 else -root)
                report.rescaled.append(name)
            target.lora_down.weight.copy_(down)
            target.lora_up.weight.copy_(up)
            report.loaded.append(name)
        report.missing_from_file = sorted(set(by_name) - set(report.loaded))
        logger.info("%s: loaded %d LoRA modules from %s", flag, len(report.loaded), path)
        if report.unmatched_in_file:
            logger.warning(
                "%s: %d modules of the file match no module of this network: %s",
                flag,
                len(report.unmatched_in_file),
                ", ".join(report.unmatched_in_file[:5])
                + (" ..." if len(report.unmatched_in_file) > 5 else ""),
            )
        if report.missing_from_file:
            logger.warning(
                "%s: %d modules of the network are not in the file and keep their initial values",
                flag,
                len(report.missing_from_file),
            )
        if report.rescaled:
            logger.warning(
                "%s: alpha of %d modules differs from the file; factors rescaled to keep the file's update",
                flag,
                len(report.rescaled),
            )
        return report

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Max-norm regularisation (``--scale_weight_norms``).

        Per module ``dW = (alpha / r) * up @ down``; when ``||dW||_F > max_norm`` both factors are scaled
        by ``sqrt(max_norm / ||dW||_F)``. The norm is computed from the ``r x r`` Gram matrices, never
        forming ``dW``. Returns (modules scaled, mean norm, max norm) after scaling.
        """
        scaled = 0
        norms = []
        for m in self.modules_list():
            down = m.lora_down.weight.float()
            up = m.lora_up.weight.float()
            sq = ((up.T @ up) * (down @ down.T)).sum().clamp_min(0.0)
            norm = float(sq.sqrt()) * abs(m.scale)
            if norm > max_norm:
                factor = math.sqrt(max_norm / norm)
                m.lora_down.weight.mul_(factor)
                m.lora_up.weight.mul_(factor)
                scaled += 1
                norm = max_norm
            norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    @torch.no_grad()
    def merge_into_base(self, multiplier: float | None = None) -> int:
        """``W <- W + m * (alpha / r) * up @ down`` for every module, then unwrap the Linears.

        Computed in fp32 (fp16 when the base weight is fp8) on the base weight's device and cast back.
        Returns the number of weights changed. fp8 weights carrying a separate scale (``scale_weight``)
        cannot be merged into directly.
        """
        self.remove()
        count = 0
        for m in self.modules_list():
            weight = m.base.weight
            if getattr(m.base, "scale_weight", None) is not None:
                raise NotImplementedError(f"{m.path}: cannot merge a LoRA into a scaled fp8 weight")
            compute = torch.float16 if weight.dtype in _FP8_DTYPES else torch.float32
            delta = m.delta_weight(compute, multiplier).to(weight.device)
            weight.data.copy_((weight.data.to(compute) + delta).to(weight.dtype))
            count += 1
        return count

    def module_dims(self) -> dict[str, tuple[int, float]]:
        return {name: (m.rank, float(m.alpha)) for name, m in self.loras.items()}


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
