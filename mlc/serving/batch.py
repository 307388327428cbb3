"""The batch job: score a file of records into another, in large chunks, then exit.

Formats follow the file suffix: ``.parquet`` and ``.csv`` (read and written with
pyarrow), anything else JSON lines. Output record *i* is the model's output for input
record *i* (blank JSON lines skipped), which is how stage tests match outputs to samples
and labels. The output appears atomically when the job succeeds, so a crashed or retried
job never leaves half a file that looks complete.

Two engines, one result:

* **columnar** (pyarrow installed): the input streams in Arrow record batches of
  ``chunk_size`` rows, is checked against the input schema column by column, scored by
  the model's ``score_columns(columns)`` when it has one (a dict of numpy arrays in and
  out: no per-record Python at all) or else by ``score_batch`` on the chunk's records,
  and streams out through Arrow writers. A reader thread parses up to four chunks ahead
  and a writer thread writes up to four behind, so parsing (pyarrow, without the GIL),
  scoring and writing overlap. This is what reaches millions of records per second:
  per-record dicts and JSON calls, not the model, bound the record engine.
* **records** (JSON lines only): ``orjson`` line by line and ``score_batch`` per chunk.
  It runs where pyarrow is absent (slim model images), and whenever the columnar
  reader refuses a JSON-lines file, so a bad line is reported as ``file:line`` by the
  same checks the model server applies.
"""

from __future__ import annotations

import collections
import importlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypedDict

import orjson

from mlc.errors import MLCError, ScoringError
from mlc.manifest import InputField
from mlc.serving.model_code import LoadedModel, Record, load_model
from mlc.serving.validation import InvalidRecordsError, RecordValidator

DEFAULT_CHUNK_SIZE = 65_536
"""Records per model call: large enough to amortise every per-call cost, small enough to stream."""

Format = Literal["jsonl", "parquet", "csv"]
_SUFFIXES: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_ARROW_MODULES: dict[Format, str] = {
    "parquet": "pyarrow.parquet",
    "csv": "pyarrow.csv",
    "jsonl": "pyarrow.json",
}
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


class BatchSummary(TypedDict):
    """What the job prints as its final JSON line."""

    model: str
    records: int
    seconds: float
    """Wall time of reading, scoring and writing (model loading excluded)."""
    load_seconds: float
    """Wall time of loading the model and importing the reader (pyarrow)."""
    output: str
    engine: str
    """``columnar`` or ``records`` (see the module docstring)."""


class _Fallback(Exception):
    """The columnar reader refused a JSON-lines file: rerun it with the record engine."""


def file_format(path: Path) -> Format:
    """The format a path's suffix names (JSON lines unless ``.parquet``/``.pq``/``.csv``)."""
    return _SUFFIXES.get(path.suffix.lower(), "jsonl")


def run_batch(
    package_dir: Path,
    input_path: Path,
    output_path: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> BatchSummary:
    """Load the model, score every record of ``input_path`` and write ``output_path``.

    Raises:
        InvalidPackageError: the package cannot be loaded.
        InvalidRecordsError: an input record is not JSON or does not match the schema;
            the message names ``file:line`` (JSON lines) or ``file: row N``.
        ScoringError: the model raised or returned outputs that do not match its inputs.
        MLCError: Parquet or CSV was asked for without pyarrow installed.
    """
    started = time.perf_counter()
    model = load_model(package_dir)
    formats = (file_format(input_path), file_format(output_path))
    try:
        # Imported here so that the job's time is reading, scoring and writing only.
        for module in ("pyarrow", "pyarrow.compute", *{_ARROW_MODULES[f] for f in formats}):
            importlib.import_module(module)
        columnar = True
    except ImportError:
        if formats != ("jsonl", "jsonl"):
            raise MLCError(
                f"batch job of model {model.name}: Parquet and CSV need pyarrow (pip install pyarrow)"
            ) from None
        columnar = False
    loaded = time.perf_counter()
    tmp = output_path.with_name(f".{output_path.name}.tmp{os.getpid()}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        count = -1
        if columnar and (formats[0] != "jsonl" or model.manifest.input_schema):
            try:
                count = _columnar(model, input_path, tmp, formats, chunk_size)
            except _Fallback:
                count = -1
        if count < 0:
            if formats[0] != "jsonl":
                raise MLCError(f"internal: no record engine for {formats[0]} input")  # unreachable
            columnar = False
            count = _records(model, input_path, tmp, formats[1], chunk_size)
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
        "engine": "columnar" if columnar else "records",
    }


# --- the record engine (JSON lines) ----------------------------------------------------


def _records(model: LoadedModel, input_path: Path, tmp: Path, out_format: Format, chunk_size: int) -> int:
    validator = RecordValidator(model.manifest.input_schema)
    count = 0
    with input_path.open("rb") as source:
        write, close = _writer(tmp, out_format)
        try:
            for lines, records in _chunks(source, input_path, chunk_size):
                _validate(validator, model, input_path, lines, records)
                outputs = _score(model, records, f"{input_path} lines {lines[0]}-{lines[-1]}")
                write(outputs, None)
                count += len(records)
        finally:
            close()
    return count


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


def _score(model: LoadedModel, records: list[Record], where: str) -> list[Record]:
    try:
        outputs = model.score_batch(records)
    except Exception as exc:
        raise ScoringError(
            f"model {model.name} raised {type(exc).__name__}: {exc} while scoring {where}"
        ) from exc
    if type(outputs) is not list or len(outputs) != len(records) or not all(type(o) is dict for o in outputs):
        raise ScoringError(
            f"model {model.name}: score_batch() must return a list of {len(records)} dicts (scoring {where})"
        )
    return outputs


# --- the columnar engine (pyarrow) -----------------------------------------------------


def _columnar(
    model: LoadedModel, input_path: Path, tmp: Path, formats: tuple[Format, Format], chunk_size: int
) -> int:
    import pyarrow as pa

    schema = model.manifest.input_schema
    in_format, out_format = formats
    count = 0
    write, close = _writer(tmp, out_format)
    try:
        with _Behind(write) as behind:
            try:
                for batch in _ahead(_arrow_batches(input_path, in_format, schema, chunk_size)):
                    _check_columns(batch, schema, model, input_path, count, in_format)
                    where = f"{input_path} records {count + 1}-{count + batch.num_rows}"
                    if model.score_columns is not None:
                        behind.write(None, _score_columns(model, batch, where))
                    else:
                        behind.write(_score(model, batch.to_pylist(), where), None)
                    count += batch.num_rows
            except pa.ArrowInvalid as exc:
                if in_format == "jsonl":
                    raise _Fallback from exc
                raise InvalidRecordsError(
                    f"{input_path}: cannot read as {in_format} for model {model.name}: {exc}",
                    [{"record": count, "field": None, "problem": str(exc)}],
                ) from exc
            except InvalidRecordsError:
                if in_format == "jsonl":
                    raise _Fallback from None  # the record engine names the line
                raise
    finally:
        close()
    return count


_AHEAD = 4
"""Chunks read ahead of the model and written behind it (each side), in other threads."""


def _ahead(batches: Iterator[Any], depth: int = _AHEAD) -> Iterator[Any]:
    """``batches``, produced by a reader thread up to ``depth`` chunks ahead of the consumer.

    Arrow's readers release the GIL while they parse, so reading the next chunks overlaps
    with checking, scoring and writing this one. An error in the reader is raised here,
    at the point of the stream where it happened.
    """
    chunks: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: tuple[bool, Any]) -> bool:
        """Queue ``item`` unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer((True, batch)):
                    return
            offer((False, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            offer((False, exc))

    reader = threading.Thread(target=produce, name="mlc-batch-reader", daemon=True)
    reader.start()
    try:
        while True:
            more, item = chunks.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        reader.join()


class _Behind:
    """Runs ``write`` in a writer thread, at most ``depth`` chunks behind the caller.

    Writing (formatting JSON lines, encoding Parquet, the file system) overlaps with
    reading and scoring the next chunks. Chunks are written in order; the first error
    of the writer is raised by the next ``write`` or by leaving the ``with`` block.
    """

    def __init__(self, write: Write, depth: int = _AHEAD) -> None:
        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlc-batch-writer")
        self._pending: collections.deque[Future[None]] = collections.deque()
        self._depth = depth

    def write(self, records: list[Record] | None, columns: dict[str, Any] | None) -> None:
        """Queue one chunk, waiting while ``depth`` chunks are still being written."""
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, records, columns))

    def __enter__(self) -> _Behind:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            while self._pending:
                future = self._pending.popleft()
                if kind is None:
                    future.result()
                else:
                    future.cancel()
        finally:
            self._pool.shutdown(wait=True)


def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    return {"number": pa.float64(), "integer": pa.int64(), "boolean": pa.bool_(), "string": pa.string()}[kind]


def _arrow_batches(path: Path, fmt: Format, schema: Sequence[InputField], chunk_size: int) -> Iterator[Any]:
    """Record batches of about ``chunk_size`` rows, read in streaming fashion."""
    import pyarrow as pa

    explicit = pa.schema([(f.name, _arrow_type(f.type)) for f in schema]) if schema else None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_size)
        return
    if fmt == "csv":
        import pyarrow.csv as pcsv

        types = {field.name: field.type for field in explicit} if explicit is not None else None
        reader = pcsv.open_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    else:
        import pyarrow.json as pjson

        reader = pjson.open_json(
            path,
            read_options=pjson.ReadOptions(block_size=16 << 20),
            parse_options=pjson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="error"),
        )
    for batch in reader:
        for start in range(0, batch.num_rows, chunk_size):
            yield batch.slice(start, chunk_size)


def _compatible(kind: str, arrow_type: Any) -> bool:
    import pyarrow.types as t

    if kind == "number":
        return bool(t.is_floating(arrow_type) or t.is_integer(arrow_type))
    if kind == "integer":
        return bool(t.is_integer(arrow_type))
    if kind == "boolean":
        return bool(t.is_boolean(arrow_type))
    return bool(t.is_string(arrow_type) or t.is_large_string(arrow_type))


def _check_columns(
    batch: Any, schema: Sequence[InputField], model: LoadedModel, path: Path, offset: int, fmt: Format
) -> None:
    """The schema check of :class:`RecordValidator`, per column instead of per record."""
    if not schema:
        return
    import pyarrow.compute as pc

    fields = {f.name: f for f in schema}
    row = "line" if fmt == "jsonl" else "row"

    def refuse(index: int, name: str | None, problem: str) -> InvalidRecordsError:
        field = f" field {name!r}:" if name else ""
        return InvalidRecordsError(
            f"{path}: {row} {offset + index + 1}:{field} {problem} (input schema of model {model.name})",
            [{"record": offset + index, "field": name, "problem": problem}],
        )

    for name, arrow_type in zip(batch.schema.names, batch.schema.types, strict=True):
        spec = fields.get(name)
        if spec is None:
            raise refuse(0, name, "unknown field (not in the input schema)")
        if not _compatible(spec.type, arrow_type) and batch.column(name).null_count < batch.num_rows:
            raise refuse(0, name, f"expected {spec.type}, got {arrow_type}")
    present = set(batch.schema.names)
    for spec in schema:
        if not spec.required:
            continue
        if spec.name not in present:
            raise refuse(0, spec.name, "required field is missing")
        column = batch.column(spec.name)
        if column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise refuse(first, spec.name, "required field is missing")


def _score_columns(model: LoadedModel, batch: Any, where: str) -> dict[str, Any]:
    assert model.score_columns is not None
    columns = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}
    try:
        outputs = model.score_columns(columns)
    except Exception as exc:
        raise ScoringError(
            f"model {model.name} raised {type(exc).__name__}: {exc} in score_columns() while scoring {where}"
        ) from exc
    if not isinstance(outputs, Mapping) or not all(len(v) == batch.num_rows for v in outputs.values()):
        raise ScoringError(
            f"model {model.name}: score_columns() must return a dict of {batch.num_rows}-long columns "
            f"(scoring {where})"
        )
    return dict(outputs)


# --- writers ---------------------------------------------------------------------------

Write = Callable[[list[Record] | None, dict[str, Any] | None], None]


def _writer(path: Path, fmt: Format) -> tuple[Write, Callable[[], None]]:
    """``write(records, columns)`` (exactly one given) and ``close()`` for ``path`` in ``fmt``."""
    if fmt == "jsonl":
        sink = path.open("wb")

        def write_jsonl(records: list[Record] | None, columns: dict[str, Any] | None) -> None:
            if columns is not None:
                sink.write(_jsonl_from_columns(columns))
            else:
                assert records is not None
                sink.write(b"".join([orjson.dumps(r, option=_JSON_OPTIONS) for r in records]))

        return write_jsonl, sink.close

    import pyarrow as pa

    state: dict[str, Any] = {}

    def write_arrow(records: list[Record] | None, columns: dict[str, Any] | None) -> None:
        table = pa.Table.from_pydict(columns) if columns is not None else pa.Table.from_pylist(records or [])
        writer = state.get("writer")
        if writer is None:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                writer = pq.ParquetWriter(path, table.schema)
            else:
                import pyarrow.csv as pcsv

                writer = pcsv.CSVWriter(path, table.schema)
            state["writer"], state["schema"] = writer, table.schema
        schema = state["schema"]
        writer.write_table(table if table.schema == schema else table.cast(schema))

    def close_arrow() -> None:
        writer = state.get("writer")
        if writer is not None:
            writer.close()
        elif not path.exists():
            path.write_bytes(b"")  # no records: an empty output, still written atomically

    return write_arrow, close_arrow


_FAST_KINDS = frozenset("biuf")
"""numpy dtype kinds orjson writes natively and whose JSON never contains a comma."""


def _jsonl_from_columns(columns: dict[str, Any]) -> bytes:
    """JSON lines of ``{name: value, ...}`` per row, without a dict or a call per row.

    Each numeric or boolean column is written once by orjson as a JSON array and split
    at its commas into per-row tokens; rows are then joined from the tokens and the
    quoted names by list slicing, all in C. Other columns take the per-row path.
    """
    import numpy as np

    arrays = {name: np.ascontiguousarray(value) for name, value in columns.items()}
    rows = len(next(iter(arrays.values()))) if arrays else 0
    if rows == 0:
        return b""
    if not all(a.dtype.kind in _FAST_KINDS and a.ndim == 1 for a in arrays.values()):
        lists = {name: a.tolist() for name, a in arrays.items()}
        names = list(lists)
        return b"".join(
            orjson.dumps(dict(zip(names, values, strict=True)), option=_JSON_OPTIONS)
            for values in zip(*lists.values(), strict=True)
        )
    width = 2 * len(arrays) + 1
    pieces: list[bytes] = [b""] * (rows * width)
    for index, (name, array) in enumerate(arrays.items()):
        key = (b"{" if index == 0 else b",") + orjson.dumps(name) + b":"
        pieces[2 * index :: width] = [key] * rows
        pieces[2 * index + 1 :: width] = orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(
            b","
        )
    pieces[width - 1 :: width] = [b"}\n"] * rows
    return b"".join(pieces)
