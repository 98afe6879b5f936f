"""GGUF conversion keeps float32 where it was and saves bfloat16 beside it when asked, so a large
model's converted copy is half the bytes. The packaged model's real GGUF, converted into a fresh
cache."""

from __future__ import annotations

import json

import pytest

from ragllm.config import load_settings
from ragllm.models import converted_gguf, packaged_gguf


@pytest.fixture(scope="module")
def packaged():
    gguf = packaged_gguf()
    assert gguf is not None, "the packaged model is installed by `make install`"
    return gguf


def test_bfloat16_is_a_checkpoint_of_its_own_beside_the_float32_one(packaged, tmp_path):
    from safetensors import safe_open

    float32 = converted_gguf(packaged, load_settings().engine.model_cache_dir)
    bfloat16 = converted_gguf(packaged, tmp_path, dtype="bfloat16")
    assert bfloat16.name == f"{float32.name}-bfloat16"
    assert json.loads((bfloat16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(bfloat16 / "model.safetensors"), framework="pt") as weights:
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}
    assert dtypes == {"BF16"}
    assert (bfloat16 / "tokenizer_config.json").is_file()
    assert converted_gguf(packaged, tmp_path, dtype="bfloat16") == bfloat16  # converted once
