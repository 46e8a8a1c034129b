"""A written QC report read back (JSON only: cheap enough for ``gateway-agent status``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["latest_outliers"]


def latest_outliers(report_dir: Path) -> list[dict[str, Any]]:
    """Outliers of the report in ``report_dir`` (``[]`` when there is none or it is unreadable)."""
    try:
        data = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    outliers = data.get("outliers", []) if isinstance(data, dict) else []
    return [o for o in outliers if isinstance(o, dict)]
