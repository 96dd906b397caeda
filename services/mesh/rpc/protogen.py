"""Generate the Python gRPC stubs in services/mesh/stubs from protos/.

The stubs are committed so a fresh clone runs without grpcio-tools; tests regenerate
them into a temporary folder and fail when the committed copies drift from the protos.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "protos"
STUBS_DIR = Path(__file__).resolve().parents[1] / "stubs"
PROTO_PACKAGE = "sluice/v1"
# protoc writes imports as the proto package path; the stubs live in a Python package instead.
_IMPORT_RE = re.compile(r"^from sluice\.v1 import ", re.MULTILINE)
_STUBS_IMPORT = "from services.mesh.stubs import "


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into out_dir (flat) and return the written files."""
    from grpc_tools import protoc  # only needed by developers and tests

    protos = sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed for {[p.name for p in protos]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(raw) / PROTO_PACKAGE).iterdir()):
            dest = out_dir / src.name
            dest.write_text(_IMPORT_RE.sub(_STUBS_IMPORT, src.read_text()))
            written.append(dest)
    (out_dir / "__init__.py").write_text('"""Generated gRPC stubs; run `make protos` after editing protos/."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=STUBS_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
