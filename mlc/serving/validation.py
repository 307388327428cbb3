"""Fast checks of scoring records against a manifest's ``input_schema``.

Runs on every request, so the schema is compiled once into per-field type checks and a
record costs a few dict and ``type()`` look-ups; no pydantic model per request. Batches
are checked column by column first, in C-level loops (``map`` over the records with one
field's ``itemgetter``, then the set of ``type()`` it yields): that shows a well-formed
batch valid in about half the time of a record-by-record pass. Anything it cannot show
valid (a missing optional field, a wrong type) goes record by record, which also says
what is wrong and where.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any, TypedDict

from mlc.errors import MLCError
from mlc.manifest import FieldType, InputField

_TYPES: dict[FieldType, tuple[type, ...]] = {
    # bool is a subclass of int, so exact type() membership keeps true/false out of numbers.
    "number": (int, float),
    "integer": (int,),
    "string": (str,),
    "boolean": (bool,),
}
_COLUMN_CHECK_RECORDS = 16
"""Batches of at least this many records are checked by column first (below, the fixed
cost of one pass per field outweighs what it saves)."""
_MAX_SHAPES = 1024
"""Valid record shapes remembered per validator (optional fields multiply them; memory stays bounded)."""
_JSON_NAMES: dict[type, str] = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    list: "array",
    dict: "object",
    type(None): "null",
}


class Problem(TypedDict):
    """One reason a record was rejected (a 422 ``details`` entry)."""

    record: int
    field: str | None
    problem: str


class InvalidRecordsError(MLCError):
    """Records do not match the model's input schema; ``problems`` says where and why."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


class RecordValidator:
    """Checks records against one input schema; an empty schema accepts any object."""

    def __init__(self, schema: Sequence[InputField]) -> None:
        self._types = {f.name: _TYPES[f.type] for f in schema}
        self._names = {f.name: f.type for f in schema}
        self._required = frozenset(f.name for f in schema if f.required)
        self._enabled = bool(schema)
        self._valid_shapes: set[tuple[Any, ...]] = set()
        """Key orders plus value types seen valid: a record's validity depends on nothing else."""
        self._columns = [
            (itemgetter(f.name), frozenset(self._types[f.name] + (() if f.required else (type(None),))))
            for f in schema
        ]
        """Per field: how to read it from a record, and every ``type()`` a valid value may have."""

    def _complete_and_valid(self, records: Sequence[Any]) -> bool:
        """True when every record is an object holding exactly the schema's fields, each well typed.

        False means "not shown valid this way" (a missing optional field, say), not "invalid".
        """
        if not set(map(type, records)) <= {dict}:
            return False
        if set(map(len, records)) != {len(self._columns)}:
            return False  # with every field present (checked below), no record has unknown ones
        try:
            return all(set(map(type, map(field, records))) <= allowed for field, allowed in self._columns)
        except KeyError:  # a field is missing from some record
            return False

    def problems(
        self, records: Sequence[Any], *, first_index: int = 0, limit: int | None = None
    ) -> list[Problem]:
        """Every problem in ``records`` (empty when all are valid), or the first ``limit``.

        Args:
            records: Decoded JSON values, expected to be objects.
            first_index: Index reported for ``records[0]`` (batch jobs number lines).
            limit: Stop after about this many problems: one record with a million unknown
                fields would otherwise make a million problem entries.
        """
        if self._enabled and len(records) >= _COLUMN_CHECK_RECORDS and self._complete_and_valid(records):
            return []  # the common case for batches: whole columns checked in C loops
        shapes = self._valid_shapes
        if all(type(r) is dict and (*r, *map(type, r.values())) in shapes for r in records):
            return []  # the common case: records shaped like ones already checked
        found: list[Problem] = []
        types = self._types
        for offset, record in enumerate(records):
            if limit is not None and len(found) >= limit:
                return found[:limit]
            index = first_index + offset
            if type(record) is not dict:
                found.append(
                    {
                        "record": index,
                        "field": None,
                        "problem": f"expected an object, got {_name(record)}",
                    }
                )
                continue
            if not self._enabled:
                continue
            missing = self._required.difference(record)
            for name in sorted(missing):
                found.append({"record": index, "field": name, "problem": "required field is missing"})
            for name, value in record.items():
                allowed = types.get(name)
                if allowed is None:
                    found.append(
                        {
                            "record": index,
                            "field": name,
                            "problem": "unknown field (not in the input schema)",
                        }
                    )
                elif type(value) not in allowed and not (value is None and name not in self._required):
                    found.append(
                        {
                            "record": index,
                            "field": name,
                            "problem": f"expected {self._names[name]}, got {_name(value)}",
                        }
                    )
                else:
                    continue  # the common case: no extra check per valid field
                if limit is not None and len(found) >= limit:
                    return found[:limit]
            if not found or found[-1]["record"] != index:
                self._remember(record)
        return found if limit is None else found[:limit]

    def _remember(self, record: dict[str, Any]) -> None:
        if len(self._valid_shapes) < _MAX_SHAPES:
            self._valid_shapes.add((*record, *map(type, record.values())))


def _name(value: Any) -> str:
    """JSON name of ``value``'s type, for messages people read."""
    return _JSON_NAMES.get(type(value), type(value).__name__)
