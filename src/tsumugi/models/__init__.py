"""Model loading: format detection, key conversion, built-in configs (see docs/model_files.md).

Public entry points live in :mod:`tsumugi.models.loader` (``load_dit``, ``load_vae``,
``load_text_encoder``, ``load_info``); this package imports nothing heavy on its own.
"""
