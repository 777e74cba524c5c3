"""Rendering for the CLI: a table by default, JSON with --json. Rendering lives only here."""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False,
                   highlight=False)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return "{" + ", ".join(str(v) for v in value) + "}"
    return str(value)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool,
         *, single: bool = False) -> None:
    """Print `rows` as a table of `columns`, or all their keys as JSON."""
    if as_json:
        data: Any = rows[0] if single and len(rows) == 1 else list(rows)
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    _console().print(table)


def emit_list(row: dict[str, Any], as_json: bool) -> None:
    """One object as `Name : value` lines (PowerShell's Format-List), or JSON."""
    if as_json:
        sys.stdout.write(json.dumps(row, indent=2, ensure_ascii=False, default=str) + "\n")
        return
    width = max(len(k) for k in row)
    for key, value in row.items():
        sys.stdout.write(f"{key.ljust(width)} : {_cell(value)}\n")
