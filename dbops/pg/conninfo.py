"""libpq connection strings: parse and build (psycopg's own parser, so quoting is libpq's)."""

from __future__ import annotations

from typing import Any


class ConninfoError(ValueError):
    """A string libpq cannot parse."""


def parse(conninfo: str) -> dict[str, Any]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as e:
        raise ConninfoError(str(e)) from None


def make(**params: Any) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(**params)
