"""Model-weights measurement: determinism, sensitivity, symlink policy, streaming, manifests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tee_inference.cli import main as measure_main
from tee_inference.measure import (
    MANIFEST_HEADER,
    MeasurementError,
    MeasurementMismatch,
    check_model,
    measure_model,
    parse_manifest,
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / "sub" / "tokenizer.json").write_text("tok")
    (root / ".hidden").write_text("h")
    (root / "empty-dir").mkdir()
    return root


def test_same_root_twice_and_format(model: Path) -> None:
    first, second = measure_model(model), measure_model(model)
    assert first == second
    text = first.manifest_text()
    assert text.startswith(MANIFEST_HEADER + "\n")
    assert first.root == hashlib.sha256(text.encode()).hexdigest()
    assert [f.path for f in first.files] == [
        ".hidden",
        "config.json",
        "model.safetensors",
        "sub/tokenizer.json",
    ]
    entry = first.files[2]
    assert entry.size == 256 * 64
    assert entry.sha256 == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert f"{entry.sha256}  {entry.size}  model.safetensors\n" in text
    assert first.total_bytes == sum(f.stat().st_size for f in model.rglob("*") if f.is_file())


def test_matches_shell_recipe(model: Path) -> None:
    """The coreutils one-liner from the module docstring gives the same root."""
    (model / "name with  spaces").write_text("s")
    recipe = (
        "{ echo tee-inference-model-manifest/v1; find -L . -type f -printf '%P\\n' | LC_ALL=C sort | "
        'while IFS= read -r f; do printf \'%s  %s  %s\\n\' "$(sha256sum < "$f" | cut -c1-64)" '
        '"$(stat -L -c %s "$f")" "$f"; done; } | sha256sum'
    )
    out = subprocess.run(["bash", "-c", recipe], cwd=model, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == measure_model(model).root


@pytest.mark.parametrize(
    "change",
    ["one_byte", "rename", "add_file", "remove_file", "add_empty_file", "add_hidden_dir_file", "move_dir"],
)
def test_any_change_changes_root(model: Path, change: str) -> None:
    before = measure_model(model)
    weights = model / "model.safetensors"
    if change == "one_byte":
        data = bytearray(weights.read_bytes())
        data[1000] ^= 1
        weights.write_bytes(bytes(data))
    elif change == "rename":
        weights.rename(model / "model2.safetensors")
    elif change == "add_file":
        (model / "extra.bin").write_bytes(b"x")
    elif change == "remove_file":
        (model / "sub" / "tokenizer.json").unlink()
    elif change == "add_empty_file":
        (model / "empty").touch()
    elif change == "add_hidden_dir_file":
        (model / ".cache").mkdir()
        (model / ".cache" / "lock").touch()
    elif change == "move_dir":
        (model / "sub").rename(model / "sub2")
    after = measure_model(model)
    assert after.root != before.root
    with pytest.raises(MeasurementMismatch):
        after.verify_against(before)


def test_empty_dirs_ignored(model: Path) -> None:
    before = measure_model(model)
    (model / "another" / "nested").mkdir(parents=True)
    assert measure_model(model).root == before.root


def test_exclusions_recorded(model: Path) -> None:
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref")
    full = measure_model(model)
    excluded = measure_model(model, exclude=[".git", "*.tmp"])
    assert ".git/HEAD" in [f.path for f in full.files]
    assert ".git/HEAD" not in [f.path for f in excluded.files]
    assert "exclude *.tmp\nexclude .git\n" in excluded.manifest_text()
    (model / "x.tmp").write_text("junk")
    assert measure_model(model, exclude=[".git", "*.tmp"]).root == excluded.root
    # Same files, but the manifest says what was left out, so the root differs.
    (model / ".git" / "HEAD").unlink()
    (model / ".git").rmdir()
    (model / "x.tmp").unlink()
    assert measure_model(model, exclude=[".git"]).root != measure_model(model).root


def test_symlink_inside_measured_as_content(model: Path) -> None:
    (model / "blobs").mkdir()
    (model / "blobs" / "abc").write_bytes(b"weights")
    (model / "snap.bin").symlink_to("blobs/abc")
    result = measure_model(model)
    by_path = {f.path: f for f in result.files}
    assert by_path["snap.bin"].sha256 == hashlib.sha256(b"weights").hexdigest()
    assert by_path["snap.bin"].size == 7
    # Pointing the link elsewhere inside changes the root even though no file changed.
    (model / "blobs" / "def").write_bytes(b"other")
    before = measure_model(model).root
    (model / "snap.bin").unlink()
    (model / "snap.bin").symlink_to("blobs/def")
    assert measure_model(model).root != before


@pytest.mark.parametrize("kind", ["outside", "dangling", "directory", "fifo", "newline"])
def test_refused_entries(model: Path, tmp_path: Path, kind: str) -> None:
    if kind == "outside":
        (tmp_path / "secret").write_text("s")
        (model / "link").symlink_to(tmp_path / "secret")
    elif kind == "dangling":
        (model / "link").symlink_to("nowhere")
    elif kind == "directory":
        (model / "link").symlink_to("sub")
    elif kind == "fifo":
        os.mkfifo(model / "pipe")
    elif kind == "newline":
        (model / "a\nb").write_text("x")
    with pytest.raises(MeasurementError):
        measure_model(model)


def test_parallel_equals_serial(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"shard-{i:03}.bin").write_bytes(os.urandom(1000 + i * 997))
    assert measure_model(tmp_path, workers=1) == measure_model(tmp_path, workers=8) == measure_model(tmp_path)


def test_streams_large_file_with_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with big.open("wb") as handle:
        for _ in range(20):
            handle.write(block)
    seen: list[tuple[int, int]] = []
    tracemalloc.start()
    try:
        result = measure_model(tmp_path, progress=lambda done, total: seen.append((done, total)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.files[0].sha256 == hashlib.sha256(block * 20).hexdigest()
    assert peak < 8 << 20, f"peak {peak} bytes for a 20 MiB file"
    assert seen[-1] == (20 << 20, 20 << 20)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_check_names_first_differing_file(model: Path) -> None:
    manifest = measure_model(model).manifest_text()
    assert check_model(model, manifest).root == parse_manifest(manifest).root
    (model / "sub" / "tokenizer.json").write_text("TOK")  # same size, different bytes
    with pytest.raises(MeasurementMismatch, match=r"sub/tokenizer\.json") as info:
        check_model(model, manifest)
    assert info.value.path == "sub/tokenizer.json"
    (model / "config.json").write_text("{}")  # size differs: found before hashing
    with pytest.raises(MeasurementMismatch, match=r"config\.json: size"):
        check_model(model, manifest)


def test_parse_manifest_rejects_tampering(model: Path) -> None:
    text = measure_model(model).manifest_text()
    assert parse_manifest(text) == measure_model(model)
    with pytest.raises(MeasurementError):
        parse_manifest(text.replace(MANIFEST_HEADER, "other/v1"))
    lines = text.splitlines(keepends=True)
    with pytest.raises(MeasurementError, match="sorted"):
        parse_manifest(lines[0] + "".join(reversed(lines[1:])))


def test_cli_json_manifest_and_check(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.manifest"
    assert measure_main(["measure", "model", str(model), "--json", "--manifest-out", str(manifest)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["root"] == measure_model(model).root
    assert doc["files"][0] == {"path": ".hidden", "size": 1, "sha256": hashlib.sha256(b"h").hexdigest()}
    assert measure_main(["measure", "model", str(model), "--check", str(manifest)]) == 0
    assert "matches manifest" in capsys.readouterr().out
    (model / "new").write_text("n")
    assert measure_main(["measure", "model", str(model), "--check", str(manifest)]) == 1
    assert "unexpected file: new" in capsys.readouterr().err


def test_cli_module_runs(model: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tee_inference", "measure", "model", str(model)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert measure_model(model).root in out.stdout
