"""Model directory manifests: what is written, what verification refuses, and the fast path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from services.inference import manifest
from services.inference.manifest import MANIFEST, ManifestError, verify_manifest, write_manifest


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub" / "extra.json").write_text("{}")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    write_manifest(folder)
    return folder


def test_manifest_lists_every_file_but_hidden_ones_with_size_and_sha256(model_dir: Path) -> None:
    files = json.loads((model_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "sub/extra.json"]
    assert files["config.json"] == {"size": 8, "sha256": hashlib.sha256(b'{"a": 1}').hexdigest()}
    verify_manifest(model_dir)


def test_one_flipped_byte_is_refused_with_the_file_named(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.safetensors does not match its SHA-256"):
        verify_manifest(model_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: (d / "sub" / "extra.json").unlink(), r"sub/extra\.json is listed .* but missing"),
        (lambda d: (d / "injected.py").write_text("x"), r"injected\.py is not listed"),
        (lambda d: (d / "config.json").write_text('{"a": 12}'), r"config\.json has 9 bytes, the manifest says 8"),
    ],
    ids=["missing", "added", "resized"],
)
def test_missing_added_or_resized_files_are_refused(model_dir: Path, change, message: str) -> None:
    change(model_dir)
    with pytest.raises(ManifestError, match=message):
        verify_manifest(model_dir)


def test_no_manifest_is_refused_unless_explicitly_allowed(model_dir: Path) -> None:
    (model_dir / MANIFEST).unlink()
    with pytest.raises(ManifestError, match="sluice model manifest"):
        verify_manifest(model_dir)
    verify_manifest(model_dir, allow_missing=True)


def test_unchanged_files_are_not_hashed_again(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[str] = []
    real = manifest._sha256
    monkeypatch.setattr(manifest, "_sha256", lambda path, progress: hashed.append(path.name) or real(path, progress))
    verify_manifest(model_dir)
    assert sorted(hashed) == ["config.json", "extra.json", "model.safetensors"]
    hashed.clear()
    verify_manifest(model_dir)
    assert hashed == []  # the fast path: same size, mtime and inode as the last successful check
    (model_dir / "config.json").write_text('{"a": 2}')  # same size, new content and mtime
    with pytest.raises(ManifestError, match=r"config\.json does not match"):
        verify_manifest(model_dir)
    assert hashed == ["config.json"]
