"""Dataset layer: Musubi-format dataset configs, image loading, buckets, batching and previews.

Modules: ``config`` (TOML/JSON -> :class:`DatasetConfig`), ``items`` (files -> :class:`ImageItem`),
``controls`` (control-image matching), ``images`` (robust decoding), ``buckets`` (bucket list,
assignment, resize and the control resize policy), ``batching`` (batches and epochs), ``preview``
(dry-run summary and contact sheet), ``paths`` and ``problems`` (helpers).
"""

from tsumugi.data.config import DatasetConfig, load_dataset_config
from tsumugi.data.items import ImageItem, list_items

__all__ = ["DatasetConfig", "ImageItem", "list_items", "load_dataset_config"]
