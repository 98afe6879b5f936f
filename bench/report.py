"""Writing a benchmark's JSON report, the same way for every benchmark."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
