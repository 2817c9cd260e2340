"""Benchmark rows as they are measured: kept in order, printed as JSON lines and appended to a
file at once, so an interrupted run keeps every row it finished."""

from __future__ import annotations

import json
import os
from pathlib import Path


class RowLog:
    def __init__(self, path: str | os.PathLike | None = None, start_empty: bool = False, common: dict | None = None):
        """`path`: the JSON lines file (None: print only); `start_empty` truncates it first;
        `common` fields lead every row (e.g. the card)."""
        self.path = Path(path) if path else None
        self.common = dict(common or {})
        self.rows: list[dict] = []
        if self.path and start_empty:
            self.path.write_text("")

    def add(self, row: dict) -> dict:
        row = {**self.common, **row}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            with self.path.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
        return row
