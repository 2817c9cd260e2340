"""Benchmark plumbing that runs without a GPU: the row log every benchmark script writes."""

from __future__ import annotations

import json

from benchmarks.rowlog import RowLog


def test_row_log_appends_each_row_at_once_with_the_common_fields_first(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": 1}\n')
    log = RowLog(path, common={"card": "X"})
    log.add({"a": 1})
    assert path.read_text().splitlines() == ['{"old": 1}', '{"card": "X", "a": 1}']  # appended, written at once
    log.add({"a": 2, "card": "Y"})  # a row's own field wins
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == log.rows[-2:]
    assert log.rows == [{"card": "X", "a": 1}, {"card": "Y", "a": 2}]


def test_row_log_can_start_the_file_empty_or_print_only(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"old": 1}\n')
    RowLog(path, start_empty=True).add({"b": 3})
    assert path.read_text() == '{"b": 3}\n'
    assert RowLog().add({"c": 4}) == {"c": 4}
