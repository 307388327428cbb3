"""The batch job: score a JSON-lines file into another, in chunks, then exit.

Output line *i* is the model's output for input line *i*, which is how stage tests
match outputs to samples and labels. The output appears atomically when the job
succeeds, so a crashed or retried job never leaves half a file that looks complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import orjson

from mlc.errors import ScoringError
from mlc.serving.loader import LoadedModel, Record, load_model
from mlc.serving.validation import InvalidRecordsError, RecordValidator

DEFAULT_CHUNK_SIZE = 1_000
"""Records per ``score_batch`` call: large enough to vectorise, small enough to stream."""


class BatchSummary(TypedDict):
    """What the job prints as its final JSON line."""

    model: str
    records: int
    seconds: float
    """Wall time of reading, scoring and writing (model loading excluded)."""
    load_seconds: float
    output: str


def run_batch(
    package_dir: Path,
    input_path: Path,
    output_path: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> BatchSummary:
    """Load the model, score every line of ``input_path`` and write ``output_path``.

    Raises:
        InvalidPackageError: the package cannot be loaded.
        InvalidRecordsError: an input line is not JSON or does not match the schema;
            the message names ``file:line``.
        ScoringError: the model raised or returned something that is not a list of dicts.
    """
    started = time.perf_counter()
    model = load_model(package_dir)
    loaded = time.perf_counter()
    validator = RecordValidator(model.manifest.input_schema)
    tmp = output_path.with_name(f".{output_path.name}.tmp{os.getpid()}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with input_path.open("rb") as source, tmp.open("wb") as sink:
            for lines, records in _chunks(source, input_path, chunk_size):
                _validate(validator, model, input_path, lines, records)
                for output in _score(model, records, input_path, lines):
                    sink.write(
                        orjson.dumps(output, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
                    )
                count += len(records)
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    finished = time.perf_counter()
    return {
        "model": model.name,
        "records": count,
        "seconds": round(finished - loaded, 6),
        "load_seconds": round(loaded - started, 6),
        "output": str(output_path),
    }


def _chunks(source: Any, path: Path, size: int) -> Iterator[tuple[list[int], list[Any]]]:
    """Yield (line numbers, decoded values) in chunks of ``size``, skipping blank lines."""
    lines: list[int] = []
    records: list[Any] = []
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        try:
            records.append(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise InvalidRecordsError(
                f"{path}:{number}: not valid JSON: {exc}",
                [{"record": len(records), "field": None, "problem": "not valid JSON"}],
            ) from exc
        lines.append(number)
        if len(records) == size:
            yield lines, records
            lines, records = [], []
    if records:
        yield lines, records


def _validate(
    validator: RecordValidator, model: LoadedModel, path: Path, lines: list[int], records: list[Any]
) -> None:
    problems = validator.problems(records)
    if problems:
        first = problems[0]
        field = f" field {first['field']!r}:" if first["field"] else ""
        raise InvalidRecordsError(
            f"{path}:{lines[first['record']]}:{field} {first['problem']} "
            f"(input schema of model {model.name}; {len(problems)} problems in this chunk)",
            problems,
        )


def _score(model: LoadedModel, records: list[Record], path: Path, lines: list[int]) -> list[Record]:
    try:
        outputs = model.score_batch(records)
    except Exception as exc:
        raise ScoringError(
            f"model {model.name} raised {type(exc).__name__}: {exc} while scoring "
            f"{path} lines {lines[0]}-{lines[-1]}"
        ) from exc
    if type(outputs) is not list or len(outputs) != len(records) or not all(type(o) is dict for o in outputs):
        raise ScoringError(
            f"model {model.name}: score_batch() must return a list of {len(records)} dicts "
            f"(scoring {path} lines {lines[0]}-{lines[-1]})"
        )
    return outputs
