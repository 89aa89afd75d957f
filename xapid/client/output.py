"""Output for people (aligned tables, key: value blocks, a progress bar) and for scripts (JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def human_bytes(value: Any) -> str:
    try:
        n = float(value)
    except (TypeError, ValueError):
        return str(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns separated by two spaces, each as wide as its widest cell; columns in *right* right-aligned.
    The last column is not padded (no trailing blanks)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [(c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\n", " ").replace("\t", " ")


def fields_block(record: dict[str, Any]) -> str:
    """``key: value`` lines in field-name order, keys padded to one width; maps and sets as JSON."""
    if not record:
        return ""
    width = max(len(k) for k in record)
    lines = []
    for key in sorted(record, key=str.lower):
        value = record[key]
        text = json.dumps(value, sort_keys=True, ensure_ascii=False) if isinstance(value, (dict, list)) else \
            ("true" if value is True else "false" if value is False else str(value))
        lines.append(f"{key.rjust(width)}: {text}")
    return "\n".join(lines) + "\n"


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def progress_bar(fraction: float, label: str, width: int = 30) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return f"\r{label} [{'#' * filled}{'-' * (width - filled)}] {fraction * 100:5.1f}%"
