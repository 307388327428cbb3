"""The batch bench's input is what its docstring promises: seeded, distinct rows that match
the example model's input schema (a repeated sample would flatter Parquet's encoding)."""

from __future__ import annotations

from pathlib import Path

from bench.bench_batch import generate_table
from mlc.manifest import load_manifest
from mlc.serving.validation import RecordValidator

CC_FRAUD = Path(__file__).resolve().parent.parent / "examples" / "models" / "cc-fraud"


def test_rows_are_distinct_seeded_and_valid_for_the_model() -> None:
    table = generate_table(20_000, seed=7)
    rows = table.to_pylist()
    assert len({tuple(r.values()) for r in rows}) == len(rows) == 20_000
    assert generate_table(20_000, seed=7).equals(table)
    assert not generate_table(20_000, seed=8).equals(table)
    validator = RecordValidator(load_manifest(CC_FRAUD).input_schema)
    assert validator.problems(rows, limit=5) == []
