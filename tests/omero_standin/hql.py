"""A small HQL subset, evaluated over the ModelStore.

Supported (keywords case-insensitive, ``as`` optional before an alias):

    select A | select [distinct] A.path[, A.path ...] | select count([distinct] A[.path])
    from Class A
    { [left [outer] | inner] join [fetch] A.field [B] }    field: a reference or a collection
    [ where COND { and COND } ]
    [ order by A.path [asc|desc] {, ...} ]

    COND: A.path = | != | <> | < | <= | > | >= VALUE,   A.path like VALUE,
          A.path in (VALUE),   A.path is [not] null
    VALUE: :param | 'string' | number
    path: fields and references to any depth (l.parent.id, obj.details.owner.id, i.name)

``select A`` returns objects (findByQuery / findAllByQuery); field selects and count return rows
(projection). ``join fetch`` loads the joined reference or collection into the result; without
fetch, references come back unloaded and collections unloaded, as with a real server. Anything
else (or, sub-queries, functions, group by) raises omero.ApiUsageException naming the query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import omero
import omero.model
from omero.rtypes import rlong, robject, unwrap, wrap

from .model_store import ModelStore, is_collection

_TOKEN = re.compile(
    r"\s*(?:(?P<param>:\w+)|(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)"
    r"|(?P<op><>|!=|<=|>=|=|<|>)|(?P<punct>[(),])|(?P<word>[A-Za-z_][\w.]*))"
)
_KEYWORDS = {
    "select", "from", "join", "fetch", "left", "outer", "inner", "where", "and", "order",
    "by", "asc", "desc", "as", "in", "is", "not", "null", "like", "distinct", "count",
}  # fmt: skip


def _unsupported(query: str, why: str) -> omero.ApiUsageException:
    return omero.ApiUsageException(
        message=f"OMERO stand-in: unsupported query ({why}): {query!r}. "
        "See tests/omero_standin/hql.py for the supported subset."
    )


@dataclass
class Join:
    source: str
    field: str
    alias: str
    fetch: bool
    outer: bool


@dataclass
class Cond:
    path: list[str]
    op: str
    value: tuple[str, Any] | None  # ("param", name) | ("lit", value) | None for null tests


@dataclass
class Parsed:
    cls: str = ""
    alias: str = ""
    select: list[list[str]] = field(default_factory=list)
    count: bool = False
    distinct: bool = False
    joins: list[Join] = field(default_factory=list)
    conds: list[Cond] = field(default_factory=list)
    order: list[tuple[list[str], bool]] = field(default_factory=list)


class _Parser:
    def __init__(self, query: str) -> None:
        self.query = query
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        text = query.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise _unsupported(query, f"cannot read from {text[pos : pos + 20]!r}")
            kind = m.lastgroup or ""
            value = m.group(kind)
            if kind == "word" and value.lower() in _KEYWORDS:
                kind, value = "kw", value.lower()
            self.tokens.append((kind, value))
            pos = m.end()
        self.i = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

    def take(self, kind: str, value: str | None = None) -> str:
        k, v = self.peek()
        if k != kind or (value is not None and v != value):
            raise _unsupported(self.query, f"expected {value or kind}, found {v or 'end'}")
        self.i += 1
        return v

    def accept(self, value: str) -> bool:
        if self.peek() == ("kw", value):
            self.i += 1
            return True
        return False

    def path(self) -> list[str]:
        return self.take("word").split(".")

    def parse(self) -> Parsed:
        p = Parsed()
        self.take("kw", "select")
        if self.accept("count"):
            p.count = True
            self.take("punct", "(")
            p.distinct = self.accept("distinct")
            p.select = [self.path()]
            self.take("punct", ")")
        else:
            p.distinct = self.accept("distinct")
            p.select = [self.path()]
            while self.peek() == ("punct", ","):
                self.i += 1
                p.select.append(self.path())
        self.take("kw", "from")
        p.cls = self.take("word")
        self.accept("as")
        p.alias = self.take("word")
        while self.peek()[1] in ("join", "left", "inner"):
            outer = self.accept("left")
            if outer:
                self.accept("outer")
            else:
                self.accept("inner")
            self.take("kw", "join")
            fetch = self.accept("fetch")
            src = self.path()
            if len(src) != 2:
                raise _unsupported(self.query, "join paths must be alias.field")
            self.accept("as")
            alias = self.take("word") if self.peek()[0] == "word" else f"_join{len(p.joins)}"
            p.joins.append(Join(src[0], src[1], alias, fetch, outer))
        if self.accept("where"):
            p.conds.append(self.cond())
            while self.accept("and"):
                p.conds.append(self.cond())
        if self.accept("order"):
            self.take("kw", "by")
            while True:
                path = self.path()
                desc = self.accept("desc")
                if not desc:
                    self.accept("asc")
                p.order.append((path, desc))
                if self.peek() != ("punct", ","):
                    break
                self.i += 1
        if self.peek()[0] != "end":
            raise _unsupported(self.query, f"unexpected {self.peek()[1]!r}")
        return p

    def value(self) -> tuple[str, Any]:
        k, v = self.peek()
        self.i += 1
        if k == "param":
            return ("param", v[1:])
        if k == "str":
            return ("lit", v[1:-1].replace("''", "'"))
        if k == "num":
            return ("lit", float(v) if "." in v else int(v))
        raise _unsupported(self.query, f"expected a value, found {v or 'end'}")

    def cond(self) -> Cond:
        path = self.path()
        k, v = self.peek()
        if k == "op":
            self.i += 1
            return Cond(path, v, self.value())
        if self.accept("like"):
            return Cond(path, "like", self.value())
        if self.accept("in"):
            self.take("punct", "(")
            value = self.value()
            self.take("punct", ")")
            return Cond(path, "in", value)
        if self.accept("is"):
            negate = self.accept("not")
            self.take("kw", "null")
            return Cond(path, "is not null" if negate else "is null", None)
        raise _unsupported(self.query, f"unsupported condition near {v!r}")


class QueryEngine:
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    # -- public entry points (already unwrapped parameters) -------------------------------
    def objects(self, query: str, params: Any) -> list[Any]:
        parsed = _Parser(query).parse()
        if parsed.count or parsed.select != [[parsed.alias]]:
            raise _unsupported(query, "findByQuery/findAllByQuery must select the root alias")
        rows = self._rows(query, parsed, params)
        seen: dict[int, Any] = {}
        for row in rows:
            obj = row[parsed.alias]
            seen.setdefault(id(obj), obj)
        fetch = self._fetch_tree(parsed)
        return [self.store.copy_out(o, fetch.get(parsed.alias)) for o in seen.values()]

    def projection(self, query: str, params: Any) -> list[list[Any]]:
        parsed = _Parser(query).parse()
        rows = self._rows(query, parsed, params)
        if parsed.count:
            values = [self._path(query, r, parsed.select[0]) for r in rows]
            if parsed.distinct:
                values = list({_hashable(v): v for v in values}.values())
            return [[rlong(len(values))]]
        out = []
        seen = set()
        for row in rows:
            values = [self._path(query, row, p) for p in parsed.select]
            if parsed.distinct:
                key = tuple(_hashable(v) for v in values)
                if key in seen:
                    continue
                seen.add(key)
            out.append([self._wrap(v) for v in values])
        return out

    # -- evaluation ----------------------------------------------------------------------
    def _rows(self, query: str, parsed: Parsed, params: Any) -> list[dict[str, Any]]:
        values = _params(params)
        with self.store.lock:
            rows: list[dict[str, Any]] = [{parsed.alias: o} for o in self.store.all_of(parsed.cls)]
            for join in parsed.joins:
                rows = self._join(query, rows, join)
            for cond in parsed.conds:
                rows = [r for r in rows if self._test(query, r, cond, values)]
            for path, desc in reversed(parsed.order):
                rows.sort(key=lambda r, p=path: _sort_key(self._path(query, r, p)), reverse=desc)
        page = getattr(params, "theFilter", None) if params is not None else None
        if page is not None:
            offset = unwrap(page.offset) or 0
            limit = unwrap(page.limit)
            rows = rows[offset:] if limit is None else rows[offset : offset + limit]
        return rows

    def _join(self, query: str, rows: list[dict[str, Any]], join: Join) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            base = row.get(join.source)
            if base is None and join.source not in row:
                raise _unsupported(query, f"unknown alias {join.source!r}")
            targets: list[Any] = []
            if base is not None:
                if is_collection(base, join.field):
                    targets = self.store.collection(base, join.field)
                elif hasattr(base, "_" + join.field):
                    target = self.store.resolve(getattr(base, "_" + join.field))
                    targets = [target] if target is not None else []
                else:
                    raise _unsupported(query, f"{type(base).__name__} has no {join.field!r}")
            if not targets and join.outer:
                out.append({**row, join.alias: None})
            out.extend({**row, join.alias: t} for t in targets)
        return out

    def _path(self, query: str, row: dict[str, Any], path: list[str]) -> Any:
        if path[0] not in row:
            raise _unsupported(query, f"unknown alias {path[0]!r}")
        cur = row[path[0]]
        for name in path[1:]:
            if cur is None:
                return None
            if isinstance(cur, omero.model.IObject) and not cur._loaded:
                cur = self.store.resolve(cur)
                if cur is None:
                    return None
            if name == "id" and isinstance(cur, omero.model.IObject):
                cur = cur._id
            elif is_collection(cur, name):
                raise _unsupported(query, f"{'.'.join(path)} is a collection: join it")
            elif hasattr(cur, "_" + name):
                cur = getattr(cur, "_" + name)
            else:
                raise _unsupported(query, f"{type(cur).__name__} has no field {name!r}")
        if isinstance(cur, omero.model.IObject) and not cur._loaded:
            cur = self.store.resolve(cur)
        return cur if isinstance(cur, omero.model.IObject) else unwrap(cur)

    def _test(self, query: str, row: dict[str, Any], cond: Cond, values: dict[str, Any]) -> bool:
        actual = self._path(query, row, cond.path)
        if cond.op == "is null":
            return actual is None
        if cond.op == "is not null":
            return actual is not None
        assert cond.value is not None
        kind, raw = cond.value
        if kind == "param":
            if raw not in values:
                raise _unsupported(query, f"parameter :{raw} not given")
            expected = values[raw]
        else:
            expected = raw
        if isinstance(actual, omero.model.IObject):
            actual = actual._id.val
        if cond.op == "in":
            return actual in (expected if isinstance(expected, list | tuple | set) else [expected])
        if actual is None:
            return False
        if cond.op == "like":
            pattern = "^" + re.escape(str(expected)).replace("%", ".*").replace("_", ".") + "$"
            return re.match(pattern, str(actual), re.DOTALL) is not None
        ops = {
            "=": lambda a, b: a == b,
            "!=": lambda a, b: a != b,
            "<>": lambda a, b: a != b,
            "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b,
            ">=": lambda a, b: a >= b,
        }
        return bool(ops[cond.op](actual, expected))

    @staticmethod
    def _fetch_tree(parsed: Parsed) -> dict[str, dict[str, Any]]:
        trees: dict[str, dict[str, Any]] = {parsed.alias: {}}
        for join in parsed.joins:
            sub: dict[str, Any] = {}
            trees[join.alias] = sub
            if join.fetch and join.source in trees:
                trees[join.source][join.field] = sub
        return trees

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, omero.model.IObject):
            return robject(self.store.copy_out(value))
        return wrap(value)


def _params(params: Any) -> dict[str, Any]:
    if params is None or getattr(params, "map", None) is None:
        return {}
    return {k: unwrap(v) for k, v in params.map.items()}


def _hashable(v: Any) -> Any:
    return ("obj", type(v).__name__, v._id.val) if isinstance(v, omero.model.IObject) else v


def _sort_key(v: Any) -> tuple[int, Any]:
    if isinstance(v, omero.model.IObject):
        v = v._id.val
    return (1, 0) if v is None else (0, v)
