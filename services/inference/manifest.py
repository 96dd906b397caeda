"""SHA-256 manifests of model directories: written by `sluice model manifest`, checked before
the inference service loads a single byte of weights.

Every file of the directory (hidden ones aside) must be listed with its size and hash, and
every listed file must be there: a changed, missing or added file stops the service with the
file named. Hashing streams each file in 8 MiB blocks with a progress bar. Fast path: a
file whose size, modification time and inode match the last successful check of this very
directory is not hashed again (the record lives in the user's cache directory, never in the
model directory, which may be read-only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

MANIFEST = "sluice-manifest.json"
_BLOCK = 8 << 20


class ManifestError(RuntimeError):
    pass


def _files(model_dir: Path) -> list[Path]:
    def listed(path: Path) -> bool:
        hidden = any(part.startswith(".") for part in path.relative_to(model_dir).parts)
        return path.is_file() and path.name != MANIFEST and not hidden

    return sorted(p for p in model_dir.rglob("*") if listed(p))


def _sha256(path: Path, progress: tqdm) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
            progress.update(len(block))
    return digest.hexdigest()


def _progress(total: int, what: str) -> tqdm:
    return tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=None)


def write_manifest(model_dir: Path) -> Path:
    sizes = {path: path.stat().st_size for path in _files(model_dir)}
    if not sizes:
        raise ManifestError(f"{model_dir} holds no files to list")
    with _progress(sum(sizes.values()), f"hashing {model_dir.name}") as progress:
        entries = {
            path.relative_to(model_dir).as_posix(): {"size": size, "sha256": _sha256(path, progress)}
            for path, size in sizes.items()
        }
    target = model_dir / MANIFEST
    target.write_text(json.dumps({"algorithm": "sha256", "files": entries}, indent=2) + "\n")
    return target


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verified_record(model_dir: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice" / "verified"
    key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:32]
    return cache / f"{key}.json"


def verify_manifest(model_dir: Path, allow_missing: bool = False, manifest_path: Path | None = None) -> None:
    """Raise ManifestError naming the first file that differs from the manifest (by default the one
    inside the directory; one kept elsewhere can vouch for a directory Sluice may not write to)."""
    manifest_path = manifest_path or model_dir / MANIFEST
    if not manifest_path.is_file():
        if allow_missing:
            log.warning("%s has no %s: serving it UNVERIFIED (--allow-missing-manifest)", model_dir, MANIFEST)
            return
        raise ManifestError(
            f"{model_dir} has no {MANIFEST}; write one with `sluice model manifest {model_dir}` "
            "(or start with --allow-missing-manifest to serve it unverified)"
        )
    try:
        listed: dict[str, dict] = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{manifest_path} is not a Sluice manifest: {err}") from err
    present = {p.relative_to(model_dir).as_posix(): p for p in _files(model_dir)}
    if missing := sorted(set(listed) - set(present)):
        raise ManifestError(f"{model_dir}/{missing[0]} is listed in {MANIFEST} but missing")
    if unlisted := sorted(set(present) - set(listed)):
        raise ManifestError(f"{model_dir}/{unlisted[0]} is not listed in {MANIFEST}: refusing an unvouched file")
    record_path = _verified_record(model_dir)
    try:
        verified: dict[str, list] = json.loads(record_path.read_text())
    except (OSError, ValueError):
        verified = {}
    stamps = {name: _stamp(path) for name, path in present.items()}  # [size, mtime, inode]
    for name, (size, *_) in stamps.items():
        if size != listed[name]["size"]:
            raise ManifestError(f"{present[name]} has {size} bytes, the manifest says {listed[name]['size']}")
    todo = [name for name in present if verified.get(name) != [*stamps[name], listed[name]["sha256"]]]
    with _progress(sum(stamps[n][0] for n in todo), f"verifying {model_dir.name}") as progress:
        for name in todo:
            if _sha256(present[name], progress) != listed[name]["sha256"]:
                raise ManifestError(f"{present[name]} does not match its SHA-256 in {MANIFEST}")
    log.info("%s matches its manifest (%d files, %d hashed now)", model_dir, len(present), len(todo))
    if not todo:
        return
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps({n: [*stamps[n], listed[n]["sha256"]] for n in present}))
    except OSError as err:  # only the fast path is lost
        log.warning("cannot record the verification in %s: %s", record_path, err)
