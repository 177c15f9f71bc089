"""LoRA targets for Qwen-Image (``--network_module networks.lora_qwen_image``).

Targets: every ``nn.Linear`` inside each ``QwenImageTransformerBlock`` (``transformer_blocks.N``),
14 per block: ``img_mod.1``, ``attn.to_q/to_k/to_v``, ``attn.add_q_proj/add_k_proj/add_v_proj``,
``attn.to_out.0``, ``attn.to_add_out``, ``img_mlp.net.0.proj``, ``img_mlp.net.2``, ``txt_mod.1``,
``txt_mlp.net.0.proj``, ``txt_mlp.net.2`` (60 x 14 = 840 for the released model). Nothing outside
the blocks is adapted.

Modulation linears are included on purpose, to produce the same key set as Musubi: Musubi appends the
default exclude ``.*(_mod_).*``, but patterns are full-matched against *dotted* paths
(``transformer_blocks.3.img_mod.1``), where ``_mod_`` never occurs, so ``img_mod.1``/``txt_mod.1`` are
trained there too (about 28 % of the LoRA parameters at a given rank). We keep that pattern verbatim
so behaviour and files match; to leave modulation out use
``--network_args "exclude_patterns=[r'.*_mod\\.1']"``.

Files are written in the Musubi layout by default (``lora_unet_<path>.lora_down/.lora_up/.alpha``),
which Musubi, ComfyUI (generic ``lora_unet_`` map of the native Qwen keys) and diffusers
(``QwenImageLoraLoaderMixin`` converts kohya keys, folding alpha) all read as saved.
"""

from __future__ import annotations

from tsumugi.networks.lora import TargetSpec
from tsumugi.networks.lora_factory import network_factory

QWEN_IMAGE_TARGET = TargetSpec(
    name="qwen_image", display_name="Qwen-Image",
    container_classes=("QwenImageTransformerBlock",),
    default_exclude=(r".*(_mod_).*",),
    default_layout="musubi",
)

DEFAULT_SAVE_LAYOUT = QWEN_IMAGE_TARGET.default_layout


create_network = network_factory(QWEN_IMAGE_TARGET)
