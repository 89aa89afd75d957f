"""xapi's filter language for ``<class>.get_all_records_where`` and ``get_all_where``.

The grammar is xapi's (``ocaml/database/db_filter_parse.mly``)::

    expr  := value "=" value | expr "and" expr | expr "or" expr | "not" expr
           | "true" | "false" | "(" expr ")"
    value := "<text>"                 a literal
           | field "<name>"           a field of the row

Literals are double-quoted with no escapes (a literal cannot hold ``"``).  ``and`` and ``or``
have the same precedence and associate to the left; ``not`` binds *looser* than both (xapi
declares it first), so ``not A and B`` means ``not (A and B)``.  Values compare as text: each
field is rendered as xapi's database renders it (``true``/``false``, decimal integers, refs,
``YYYYMMDDTHH:MM:SSZ``, sets and maps as S-expressions).  Field names may use xapi's database
spelling with ``__`` for namespaces (``name__label``) or the API's (``name_label``).

Hostile input is bounded: the text is at most :data:`MAX_LENGTH` characters and parentheses
plus ``not`` nest at most :data:`MAX_DEPTH` deep; tokenising and parsing are one pass each and
``and``/``or`` chains are kept flat, so parsing and evaluation are linear in the input and
recursion is bounded by the nesting limit.  A bad expression is xapi's
``INVALID_VALUE [expr, reason]``; a field the class does not have is xapi's
``INTERNAL_ERROR ["missing field", name, ""]`` when a row is looked at (as xapi: not for an
empty class, nor behind a short-circuit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from collections.abc import Callable
from typing import Any

from xapid.apitypes import format_datetime
from xapid.errors import XenAPIError

MAX_LENGTH = 64 << 10
MAX_DEPTH = 64
PARSE_ERROR = "Stdlib.Parsing.Parse_error"  # what xapi's parser reports (Printexc.to_string)
LEX_ERROR = 'Failure("lexing: empty token")'
_KEYWORDS = ("true", "false", "field", "and", "or", "not")
_WHITESPACE = " \t\n"


class Refused(Exception):
    """The expression is not valid (reason as xapi words it)."""


@dataclass(frozen=True)
class Value:
    field: bool
    text: str


@dataclass(frozen=True)
class Eq:
    left: Value
    right: Value


@dataclass(frozen=True)
class Const:
    value: bool


@dataclass(frozen=True)
class Not:
    expr: Any


@dataclass(frozen=True)
class Chain:
    """``first op1 e1 op2 e2 …`` evaluated left to right (``and``/``or``, equal precedence)."""

    first: Any
    rest: tuple[tuple[str, Any], ...]


def tokenize(text: str) -> list[tuple[str, str]]:
    """``(kind, text)`` pairs; kinds are ``=``, ``(``, ``)``, a keyword, or ``str``."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _WHITESPACE:
            i += 1
        elif c in "=()":
            tokens.append((c, c))
            i += 1
        elif c == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise Refused(LEX_ERROR)
            tokens.append(("str", text[i + 1:end]))
            i = end + 1
        else:
            for word in _KEYWORDS:  # ocamllex: keywords are matched as they are, not as words
                if text.startswith(word, i):
                    tokens.append((word, word))
                    i += len(word)
                    break
            else:
                raise Refused(LEX_ERROR)
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else "eof"

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            raise Refused(PARSE_ERROR)
        text = self.tokens[self.pos][1]
        self.pos += 1
        return text

    def chain(self, depth: int) -> Any:
        first = self.unary(depth)
        rest: list[tuple[str, Any]] = []
        while self.peek() in ("and", "or"):
            op = self.take(self.peek())
            rest.append((op, self.unary(depth)))
        return first if not rest else Chain(first, tuple(rest))

    def unary(self, depth: int) -> Any:
        kind = self.peek()
        if kind in ("not", "("):
            if depth >= MAX_DEPTH:
                raise Refused(f"nesting deeper than {MAX_DEPTH} (parentheses and not)")
            self.take(kind)
            if kind == "not":
                return Not(self.chain(depth + 1))  # not takes the whole rest of the chain
            inner = self.chain(depth + 1)
            self.take(")")
            return inner
        if kind in ("true", "false"):
            self.take(kind)
            return Const(kind == "true")
        left = self.value()
        self.take("=")
        return Eq(left, self.value())

    def value(self) -> Value:
        if self.peek() == "field":
            self.take("field")
            return Value(True, self.take("str"))
        return Value(False, self.take("str"))


def parse(text: str) -> Any:
    """The expression tree of *text*; :class:`Refused` with xapi's reason when it is not valid."""
    if len(text) > MAX_LENGTH:
        raise Refused(f"expression longer than {MAX_LENGTH} characters")
    parser = _Parser(tokenize(text))
    tree = parser.chain(0)
    if parser.peek() != "eof":
        raise Refused(PARSE_ERROR)
    return tree


def compile_where(text: str) -> Any:
    """:func:`parse`, refusing as xapi: ``INVALID_VALUE [expr, reason]``."""
    try:
        return parse(text)
    except Refused as exc:
        shown = text if len(text) <= 1024 else text[:1024] + "…"
        raise XenAPIError("INVALID_VALUE", shown, str(exc)) from None


def evaluate(tree: Any, lookup: Callable[[str], str]) -> bool:
    """Whether the row whose field texts *lookup* gives matches (short-circuit, left to right)."""
    if isinstance(tree, Eq):
        return _text(tree.left, lookup) == _text(tree.right, lookup)
    if isinstance(tree, Chain):
        result = evaluate(tree.first, lookup)
        for op, expr in tree.rest:
            if op == "and":
                result = result and evaluate(expr, lookup)
            else:
                result = result or evaluate(expr, lookup)
        return result
    if isinstance(tree, Not):
        return not evaluate(tree.expr, lookup)
    return tree.value


def _text(value: Value, lookup: Callable[[str], str]) -> str:
    return lookup(value.text) if value.field else value.text


# -- rendering fields as xapi's database does ------------------------------------------------


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render(value: Any) -> str:
    """A field value as the text xapi's database compares."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, ".18g") if math.isfinite(value) else "0"
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, list):
        return "(" + " ".join(_quote(render(v)) for v in value) + ")"
    if isinstance(value, dict):
        return "(" + " ".join(f"({_quote(str(k))} {_quote(render(v))})" for k, v in value.items()) + ")"
    return str(value)


def field_lookup(fields: dict[str, Any]) -> Callable[[str], str]:
    """Field texts of one record; ``name__label`` is ``name_label``; unknown: xapi's error."""

    rendered: dict[str, str] = {}  # each field rendered once per row, however often the expression names it

    def lookup(name: str) -> str:
        text = rendered.get(name)
        if text is None:
            key = name if name in fields else name.replace("__", "_")
            if key not in fields:
                raise XenAPIError("INTERNAL_ERROR", "missing field", name, "")
            text = rendered[name] = render(fields[key])
        return text

    return lookup
