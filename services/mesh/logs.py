"""Process-wide logging setup shared by every service and the CLI."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s",
        force=True,
    )
