"""Text side of the models: bundled tokenizers and prompt encoding.

* :mod:`tsumugi.text.tokenizers` -- ``load_tokenizer(arch, override=None)``
* :mod:`tsumugi.text.qwen_image_prompt` -- ``encode_qwen_image_prompts``, ``pad_prompt_embeds``
* :mod:`tsumugi.text.zimage_prompt` -- ``encode_zimage_prompts``

Submodules are imported on demand so that importing this package stays cheap.
"""
