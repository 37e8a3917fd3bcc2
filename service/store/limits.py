"""What the database can hold: integer ranges read from the columns' own types, and text it cannot store.

This is the one place the API's bounds come from, so they cannot drift from the schema:

- PostgreSQL's INTEGER is 32-bit. A value outside [-2^31, 2^31 - 1] is refused when written, and also when
  compared with the column (SQLAlchemy's psycopg dialect casts each bound parameter to the column's type), while
  SQLite stores 64-bit integers in any column. The API bounds every integer it writes to, or compares with, a
  column by `integer_range(column)`: a value the column cannot hold is a 422 on every backend, and changing a
  column's type (say, to BigInteger in a migration) moves its API bound with it.
- A string column's length (`string_length(column)`) bounds the text the API accepts for it.
- PostgreSQL text cannot contain NUL characters, and no backend can encode an unpaired UTF-16 surrogate (which a
  JSON `"\\ud800"` escape decodes to) as UTF-8. `unstorable_text_reason` says why a string cannot be stored, so
  the API refuses it with a 422 that names the field.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Integer, SmallInteger

__all__ = ["find_unstorable_text", "integer_range", "string_length", "unstorable_text_reason"]

#: Width in bits of each integer type (most specific first: BigInteger and SmallInteger subclass Integer).
_INTEGER_BITS = ((BigInteger, 64), (SmallInteger, 16), (Integer, 32))


def integer_range(column: Any) -> tuple[int, int]:
    """The smallest and largest value an integer column holds on every supported backend.

    Args:
        column: a mapped attribute (`StepPointRow.step`) or a `Column`.

    Raises:
        TypeError: the column is not an integer column.
    """
    column_type = column.type
    for sql_type, bits in _INTEGER_BITS:
        if isinstance(column_type, sql_type):
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    raise TypeError(f"expected an integer column (got {column} of type {column_type!r})")


def string_length(column: Any) -> int:
    """The most characters a string column holds (PostgreSQL refuses longer values; SQLite would keep them).

    Raises:
        TypeError: the column has no length (Text, or not a string column).
    """
    length = getattr(column.type, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"expected a string column with a length (got {column} of type {column.type!r})")
    return length


def unstorable_text_reason(value: str) -> str | None:
    """Why the database cannot store `value` (a phrase), or None when it can."""
    if "\x00" in value:
        return "contains a NUL character (\\x00), which the database cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains an unpaired UTF-16 surrogate ({value[exc.start]!a}), which is not valid UTF-8"
    return None


def find_unstorable_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first string (key or value) in a JSON-like `value` the database cannot store, as (where, why).

    `where` is the dotted path of the field (`dataset.path`, `tags.0`; "" for `value` itself).
    """
    if isinstance(value, str):
        reason = unstorable_text_reason(value)
        return (path, reason) if reason else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            reason = unstorable_text_reason(key) if isinstance(key, str) else None
            if reason:
                return (f"{path}.{key!a}" if path else f"{key!a}", f"has a field name that {reason}")
            found = find_unstorable_text(item, where)
            if found:
                return found
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = find_unstorable_text(item, f"{path}.{index}" if path else str(index))
            if found:
                return found
    return None
