"""Batch jobs in every format and engine: same outputs, record for record, and named bad rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from mlc.serving import InvalidRecordsError, load_model, run_batch
from mlc.serving.batch import _jsonl_from_columns, _records


def eval_records(package: Path, count: int) -> list[dict[str, Any]]:
    lines = (package / "data" / "eval.jsonl").read_text().splitlines()[:count]
    return [{k: v for k, v in json.loads(line).items() if k != "is_fraud"} for line in lines]


def read_outputs(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        return rows
    if path.suffix == ".csv":
        rows = pcsv.read_csv(path).to_pylist()
        return rows
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_input(path: Path, records: list[dict[str, Any]]) -> Path:
    table = pa.Table.from_pylist(records)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("source", ["in.jsonl", "in.parquet", "in.csv"])
@pytest.mark.parametrize("target", ["out.jsonl", "out.parquet", "out.csv"])
def test_every_format_round_trips_to_the_same_outputs(
    example_package: Path, tmp_path: Path, source: str, target: str
) -> None:
    records = eval_records(example_package, 1_000)
    expected = load_model(example_package).score_batch(records)
    summary = run_batch(
        example_package, write_input(tmp_path / source, records), tmp_path / target, chunk_size=300
    )
    assert summary["records"] == 1_000 and summary["engine"] == "columnar"
    got = read_outputs(tmp_path / target)
    assert [o["is_fraud"] for o in got] == [o["is_fraud"] for o in expected]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(got, expected, strict=True)) < 1e-12


def test_the_record_engine_gives_the_columnar_outputs(example_package: Path, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", eval_records(example_package, 700))
    run_batch(example_package, source, tmp_path / "columnar.jsonl", chunk_size=256)
    assert _records(load_model(example_package), source, tmp_path / "records.jsonl", "jsonl", 256) == 700
    columnar = read_outputs(tmp_path / "columnar.jsonl")
    records = read_outputs(tmp_path / "records.jsonl")
    assert [o["is_fraud"] for o in columnar] == [o["is_fraud"] for o in records]


def test_a_bad_json_line_falls_back_to_the_record_engine_and_is_named(
    example_package: Path, tmp_path: Path
) -> None:
    records = eval_records(example_package, 3)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(records[0]) + "\n\n" + json.dumps({**records[1], "hour": 3.5}) + "\n")
    with pytest.raises(InvalidRecordsError, match=r"in\.jsonl:3: field 'hour': expected integer"):
        run_batch(example_package, source, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_parquet_row_missing_a_required_field_is_named(example_package: Path, tmp_path: Path) -> None:
    records = eval_records(example_package, 5)
    records[3]["amount"] = None
    source = write_input(tmp_path / "in.parquet", records)
    with pytest.raises(
        InvalidRecordsError, match=r"in\.parquet: row 4: field 'amount': required field is missing"
    ):
        run_batch(example_package, source, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_a_csv_with_an_unknown_column_is_refused(example_package: Path, tmp_path: Path) -> None:
    records = [{**r, "surprise": 1} for r in eval_records(example_package, 2)]
    with pytest.raises(InvalidRecordsError, match="field 'surprise': unknown field"):
        run_batch(example_package, write_input(tmp_path / "in.csv", records), tmp_path / "out.csv")


def test_json_lines_from_columns_match_orjson_per_record() -> None:
    import numpy as np

    columns = {"p": np.array([0.1, 1e-300, 2.5]), "flag": np.array([True, False, True]), "n": np.arange(3)}
    lines = _jsonl_from_columns(columns).decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"p": 0.1, "flag": True, "n": 0},
        {"p": 1e-300, "flag": False, "n": 1},
        {"p": 2.5, "flag": True, "n": 2},
    ]
    mixed = _jsonl_from_columns({"label": np.array(["a,b", "c"], dtype=object), "n": np.arange(2)})
    assert [json.loads(line) for line in mixed.decode().splitlines()] == [
        {"label": "a,b", "n": 0},
        {"label": "c", "n": 1},
    ]


def test_read_ahead_keeps_order_raises_where_the_reader_failed_and_stops_its_thread() -> None:
    import threading

    from mlc.serving.batch import _ahead

    def source(fail_at: int | None) -> Any:
        for index in range(50):
            if index == fail_at:
                raise ValueError(f"bad chunk {index}")
            yield index

    assert list(_ahead(source(None), depth=2)) == list(range(50))
    seen: list[int] = []
    with pytest.raises(ValueError, match="bad chunk 7"):
        for item in _ahead(source(7), depth=2):
            seen.append(item)
    assert seen == list(range(7))
    stream = _ahead(source(None), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer gave up early (a scoring error): the reader must not linger
    assert not [t for t in threading.enumerate() if t.name == "mlc-batch-reader"]


def test_write_behind_keeps_order_and_reports_the_writers_error() -> None:
    from mlc.serving.batch import _Behind

    written: list[int] = []

    def write(records: Any, columns: Any) -> None:
        if records == [3]:
            raise OSError("disk full")
        written.append(records[0])

    with _Behind(write, depth=2) as behind:
        for index in range(3):
            behind.write([index], None)
    assert written == [0, 1, 2]
    with pytest.raises(OSError, match="disk full"):
        with _Behind(write, depth=2) as behind:
            for index in range(3, 10):
                behind.write([index], None)
