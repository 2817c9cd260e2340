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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as stream:
                stream.write(json.dumps(row) + "\n")
        return row


def card_of(device) -> str:
    """The name of the card a torch device is on ("cpu" for the CPU)."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def provenance(card: str) -> dict:
    """The fields that say where a row comes from: one id per invocation (`call`), the card, the
    UTC date and the commit: DITAS_COMMIT when set (the GPU machine gets a copy of the working
    tree whose .git need not match it), else `git rev-parse` with "+dirty" for a changed tree."""
    import datetime
    import subprocess
    import uuid

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = os.environ.get("DITAS_COMMIT") or git("rev-parse", "--short=12", "HEAD")
    if commit is None:
        commit = "unknown"
    elif "DITAS_COMMIT" not in os.environ and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"call": f"{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}", "card": card, "date": now.strftime("%Y-%m-%d"),
            "commit": commit}
