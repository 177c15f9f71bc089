"""LoRA targets for Z-Image (``--network_module networks.lora_zimage``).

Targets: the ``nn.Linear`` layers of the main ``layers.N`` blocks (``ZImageTransformerBlock``), 7 per
layer: ``attention.to_q/to_k/to_v``, ``attention.to_out.0``, ``feed_forward.w1/w2/w3`` (30 x 7 = 210
for the released model). ``adaLN_modulation`` and both refiner stacks (``noise_refiner``,
``context_refiner``, same block class) are excluded by the default pattern ``.*(_modulation|_refiner).*``,
as in Musubi. Nothing outside the blocks is adapted.

Files are written in the ``diffusion_model`` layout by default (see ``lora_save``): Musubi's own
``lora_unet_`` keys lose the attention updates in ComfyUI, whose Z-Image model fuses q/k/v.
"""

from __future__ import annotations

from tsumugi.networks.lora import TargetSpec
from tsumugi.networks.lora_factory import network_factory

ZIMAGE_TARGET = TargetSpec(
    name="z_image", display_name="Z-Image",
    container_classes=("ZImageTransformerBlock",),
    default_exclude=(r".*(_modulation|_refiner).*",),
    default_layout="diffusion_model",
)

DEFAULT_SAVE_LAYOUT = ZIMAGE_TARGET.default_layout


create_network = network_factory(ZIMAGE_TARGET)
