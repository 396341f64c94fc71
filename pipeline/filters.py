"""The job's row filter (`manifest.filter`), pass-through columns (`manifest.extra_columns`)
and the per-sample filters of `filter.*` (preprocessing/filters.py) as the shard task applies them.

`manifest.filter` is a DuckDB SQL expression over manifest columns (`punsafe < 0.5 and WIDTH
>= 256 and similarity > 0.28`), the WHERE clause img2dataset users write in DuckDB anyway.
It is checked when the manifest is opened (syntax, one expression, every column it names
present in the file) and evaluated by each shard task over its own rows (`ShardPlan.columns`),
so planning stays a stream. A row it rejects — or for which it is NULL, as SQL's WHERE
treats NULL — is **a failed row with reason `filtered`**: it stays in the status table and
the shard's `reasons` counts, so every manifest row is accounted for; `filtered` is a
permanent reason, so `--retry-failed` does not redo it (change the filter and rerun with
`--overwrite` instead: the filter is part of the fingerprint).

CSV values are text. A column compared with a number (`punsafe < 0.5`, `x BETWEEN 1 AND 2`)
is read as a number there (a value that does not parse is NULL, so the row is rejected);
anything else needs an explicit `CAST`. Column names match case-insensitively, like DuckDB's.

The evaluation connection has external access off: the expression can read only the
shard's own rows.
"""

from __future__ import annotations

import json
import math
from typing import Any

from core.shard_format import load_npy
from pipeline.config import PrepConfig
from pipeline.manifest import ManifestError
from preprocessing.filters import FilterConfig, motion_failure

_NUMERIC_KINDS = ("INTEGER", "NUMERIC", "DECIMAL", "DOUBLE", "FLOAT", "BIGINT", "HUGEINT", "UBIGINT")
_CONSTRAINTS = ("COMPARISON", "BETWEEN")


class FilterError(ManifestError):
    """A `manifest.filter` or `manifest.extra_columns` that cannot be used; the message names the
    file and the column."""


def _connect():
    import duckdb

    return duckdb.connect(config={"enable_external_access": False})


def _parse(expression: str) -> dict[str, Any]:
    """The WHERE clause of `SELECT * FROM t WHERE (expression)` as DuckDB's JSON AST."""
    con = _connect()
    try:
        sql = f"SELECT * FROM t WHERE ({expression})"
        text = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0]
    finally:
        con.close()
    tree = json.loads(text)
    if tree.get("error"):
        raise FilterError(f"manifest.filter {expression!r} does not parse: {tree.get('error_message')}")
    statements = tree.get("statements", [])
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    source = node.get("from_table", {})
    if len(statements) != 1 or source.get("table_name") != "t" or node.get("type") != "SELECT_NODE":
        raise FilterError(f"manifest.filter {expression!r} must be one expression (a WHERE clause)")
    return node["where_clause"]


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _is_number(node: Any) -> bool:
    if not isinstance(node, dict) or node.get("class") != "CONSTANT":
        return False
    literal = node.get("literal") or node.get("value") or {}
    kind = str(literal.get("kind") or literal.get("type", {}).get("id") or "").upper()
    text = literal.get("text", literal.get("value"))
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return any(k in kind for k in _NUMERIC_KINDS)


def _column(node: Any) -> str | None:
    if isinstance(node, dict) and node.get("class") == "COLUMN_REF":
        return node["column_names"][-1]
    return None


class RowFilter:
    """`manifest.filter` bound to a manifest's column names; `keep(columns)` per shard."""

    def __init__(self, expression: str):
        self.expression = expression
        where = _parse(expression)
        names = [c for n in _walk(where) if (c := _column(n))]
        # DuckDB names are case-insensitive: `WIDTH` and `width` are one column of the view
        self.names = list({c.lower(): c for c in reversed(names)}.values())[::-1]
        numeric: set[str] = set()
        for n in _walk(where):
            if n.get("class") in _CONSTRAINTS:
                parts = [v for k, v in n.items() if k in ("left", "right", "input", "lower", "upper")]
                if any(_is_number(p) for p in parts):
                    numeric.update(c.lower() for p in parts if (c := _column(p)))
        self.numeric = numeric  # columns compared with numbers (lower case): cast text values

    def resolve(self, available: list[str], file: str) -> dict[str, str]:
        """{name in the expression: manifest column}; FilterError naming the file and column."""
        out = {}
        for name in self.names:
            found = name if name in available else next(
                (c for c in available if c.lower() == name.lower()), None)
            if found is None:
                raise FilterError(
                    f"manifest {file}: manifest.filter {self.expression!r} names column {name!r}, "
                    f"which the manifest lacks (columns: {', '.join(sorted(available))})"
                )
            out[name] = found
        return out

    def keep(self, columns: dict[str, list[Any]], mapping: dict[str, str], rows: int) -> list[bool]:
        """One bool per row: True where the expression is true (NULL and false reject)."""
        import pyarrow as pa

        arrays, select = {}, []
        for name, column in mapping.items():
            values = columns[column]
            arrays[f"c{len(arrays)}"] = pa.array(values)
            ref = f'"c{len(arrays) - 1}"'
            text = pa.types.is_string(arrays[f"c{len(arrays) - 1}"].type)
            expr = f"TRY_CAST({ref} AS DOUBLE)" if text and name.lower() in self.numeric else ref
            select.append(f'{expr} AS "{name.replace(chr(34), chr(34) * 2)}"')
        arrays["__pos"] = pa.array(range(rows), pa.int64())
        select.append('"__pos"')
        con = _connect()
        try:
            con.register("raw", pa.table(arrays))
            con.execute(f"CREATE TEMP VIEW t AS SELECT {', '.join(select)} FROM raw")
            # the very statement `_parse` checked, so the expression means what was validated
            kept = {r[0] for r in con.execute(f'SELECT "__pos" FROM t WHERE ({self.expression})').fetchall()}
        finally:
            con.close()
        return [pos in kept for pos in range(rows)]

    def check_types(self, columns: dict[str, list[Any]], mapping: dict[str, str], file: str) -> None:
        """Bind against a few real rows so a type error is a manifest-level error."""
        import duckdb

        try:
            self.keep(columns, mapping, len(next(iter(columns.values()), [])))
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            raise FilterError(f"manifest {file}: manifest.filter {self.expression!r} cannot be evaluated: "
                              f"{first}") from None


# -- the Manifest side: which extra columns to read ----------------------------------------------

_SAMPLE_ROWS = 256  # rows of the first file the filter is test-evaluated on at open


def manifest_columns(manifest: Any) -> list[str]:
    """The extra columns the shard tasks of `manifest` (a `pipeline.manifest.Manifest`) need for
    `manifest.extra_columns` and `manifest.filter`, checked against every file of a parquet
    manifest (footers only) and the first file of a CSV/JSONL one (later files are checked as
    they are read). FilterError names the file and the column; a filter that does not parse
    or bind fails here, before any work."""
    cfg, first = manifest.cfg, manifest.files[0]
    if not cfg.extra_columns and not cfg.filter:
        return []
    row_filter = RowFilter(cfg.filter) if cfg.filter else None
    mapping: dict[str, str] = {}
    files = manifest.files if manifest.format == "parquet" else [first]
    for path in files:
        shown = manifest._display(path)
        names = list(manifest._dataset(path).schema.names)
        for column in cfg.extra_columns:
            if column not in names:
                raise FilterError(
                    f"manifest {shown} has no column {column!r} (named in manifest.extra_columns; "
                    f"columns: {', '.join(sorted(names))})"
                )
        if row_filter is not None:
            # the first file decides the spelling; every file must have those very columns
            mapping = mapping or row_filter.resolve(names, shown)
            row_filter.resolve([c for c in names if c in mapping.values()], shown)
    shown = manifest._display(first)
    if row_filter is not None:
        wanted = list(dict.fromkeys(mapping.values()))
        if wanted:
            dataset = manifest._dataset(first, tuple(wanted))
            sample = dataset.head(_SAMPLE_ROWS, columns=wanted).to_pydict()
        else:
            sample = {}
        row_filter.check_types(sample, mapping, shown)
    return list(dict.fromkeys([*cfg.extra_columns, *mapping.values()]))


# -- the shard task side ------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """A manifest value as plain JSON (KEY.json must parse anywhere): NaN -> null, bytes -> hex."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    return str(value)


class ShardFilters:
    """What one shard task applies: the row filter, extra columns, motion filters."""

    def __init__(self, cfg: PrepConfig, columns: dict[str, list[Any]]):
        self.cfg: FilterConfig = cfg.filter
        self.extra_names = list(cfg.manifest.extra_columns)
        self.columns = columns
        self.row_filter = RowFilter(cfg.manifest.filter) if cfg.manifest.filter else None

    def rejected(self, plan: Any) -> dict[int, tuple[str, str, str]]:
        """{position: ("failed", "filtered", detail)} for the rows of `plan` (a ShardPlan) that
        `manifest.filter` rejects; rows with no source keep their `missing_file`."""
        if self.row_filter is None:
            return {}
        mapping = self.row_filter.resolve(list(self.columns), f"{plan.kind}/{plan.index:06d}")
        keep = self.row_filter.keep(self.columns, mapping, len(plan.sources))
        detail = "{}: manifest row {} rejected by manifest.filter ({})"
        return {pos: ("failed", "filtered", detail.format(plan.sources[pos], plan.first_row + pos,
                                                          self.row_filter.expression))
                for pos, ok in enumerate(keep) if not ok and plan.sources[pos]}

    def annotate(self, decoded: Any, slot: int | tuple[int, int]) -> None:
        """Put the row's `manifest.extra_columns` into the KEY.json (`extra`) of the sample in
        writer slot `slot`: a row position, or (position, clip) for a clip of a row."""
        if self.extra_names:
            decoded.meta["extra"] = self.extra(slot[0] if isinstance(slot, tuple) else slot)

    def extra(self, pos: int) -> dict[str, Any]:
        """This row's `manifest.extra_columns`, as JSON values (KEY.json `extra`, status columns)."""
        return {name: _jsonable(self.columns[name][pos]) for name in self.extra_names}

    def check_result(self, res: tuple, source: str, fields: dict[str, Any] | None = None) -> tuple:
        """An encoded ("ok", key, members) row, or its `static` / `scene_cut` failure (then
        `fields`, the row's status columns, gets the clip's `motion_mean`)."""
        if res[0] != "ok" or not self.cfg.motion_on:
            return res
        motion = next((data for name, data in res[2] if name.endswith(".motion.npy")), None)
        if motion is None:  # images have no motion factors
            return res
        factors = load_npy(motion)
        failure = motion_failure(self.cfg, factors)
        if failure is None:
            return res
        if fields is not None:
            fields["motion_mean"] = float(factors.astype("float64").mean())
        return ("failed", failure[0], f"{source}: {failure[1]}")
