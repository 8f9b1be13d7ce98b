"""``--format`` for ``ember ps`` and ``ember image ls``: the part of docker's Go templates
that docker users write on those commands.  Pure: parsing and rendering, no I/O.

Taken, as docker's CLI takes it: literal text; ``{{.Field}}``; ``{{json .}}`` and
``{{json .Field}}``; ``{{upper .Field}}``, ``{{lower .Field}}``, ``{{title .Field}}``;
``{{.Label "key"}}`` where the listing has labels; ``{{"text"}}``; ``{{- `` and `` -}}``
(trim the whitespace before or after); the two-character sequences ``\\t`` and ``\\n``
anywhere in the format, as a tab and a newline; a ``table`` prefix (a header row, the
columns aligned as docker's tabwriter aligns them); and ``json`` alone (``{{json .}}``,
one object a line).  Everything else (pipelines, parentheses, variables, if/range/with,
comments, other functions, unknown fields) is refused with a ``TemplateError`` that
says what, before anything is listed: docker finds an unknown field only once a row
is printed, so a listing with no rows said nothing of it.

The template is data: it is never evaluated as Python; a field is only ever looked up
by name in the values the command built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ember.cli.common import printable
from ember.errors import UsageError

#: the functions taken, and what each does to a field's value (``json`` is apart)
_FUNCTIONS = ("json", "upper", "lower", "title")
#: docker's other template functions, refused with a word on why
_DOCKER_ONLY_FUNCTIONS = ("join", "split", "pad", "truncate")
_KEYWORDS = (
    "if", "else", "end", "range", "with", "define", "template", "block", "break",
    "continue", "nil", "and", "or", "not", "len", "index", "print", "printf", "println",
    "slice", "eq", "ne", "lt", "le", "gt", "ge", "call", "html", "js", "urlquery",
)  # fmt: skip
#: columns a table may have (values never hold a tab: they are shown printable)
MAX_COLUMNS = 256
#: docker's tabwriter settings for tables (minimum cell width, padding)
_MIN_WIDTH, _PADDING = 10, 3
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_SPACE = " \t\r\n"


class TemplateError(UsageError):
    """A ``--format`` that ember cannot render: one line saying what is wrong (exit 2)."""


@dataclass(frozen=True)
class Schema:
    """The fields of one listing: what ``{{.Field}}`` may name."""

    #: the command, for messages ("ember ps")
    command: str
    #: field name -> its column header in a table (docker's words)
    headers: Mapping[str, str]
    #: whether ``{{.Label "key"}}`` is taken (the rows then carry labels)
    labels: bool = False
    #: docker's fields this listing does not have -> why (said when one is asked for)
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One listed item: its fields' values (at least the template's ``fields``)."""

    values: Mapping[str, str]
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Field:
    name: str
    #: one of _FUNCTIONS applied to it, or None
    function: str | None = None


@dataclass(frozen=True)
class _Label:
    key: str


@dataclass(frozen=True)
class _WholeJSON:
    """``{{json .}}``: every field of the row as one JSON object."""


_Node = _Text | _Field | _Label | _WholeJSON


@dataclass(frozen=True)
class Template:
    schema: Schema
    nodes: tuple[_Node, ...]
    #: a header row, and the cells (between tabs) aligned
    table: bool = False

    @property
    def fields(self) -> frozenset[str]:
        """The fields rendering needs values for (all of them for ``{{json .}}``)."""
        if any(isinstance(n, _WholeJSON) for n in self.nodes):
            return frozenset(self.schema.headers)
        return frozenset(n.name for n in self.nodes if isinstance(n, _Field))

    def render(self, rows: Iterable[Row]) -> str:
        """The whole output: each row's text and a newline; a table's header first and
        its columns aligned."""
        lines = [self._row(r) + "\n" for r in rows]
        if not self.table:
            return "".join(lines)
        return align("".join([self._header() + "\n", *lines]))

    def _row(self, row: Row) -> str:
        return "".join(_value(node, row, self.schema) for node in self.nodes)

    def _header(self) -> str:
        return "".join(_header(node, self.schema) for node in self.nodes)


def is_default(text: str) -> bool:
    """``--format table`` (or an empty format): the command's own table, as docker's
    ``--format table`` is its default output."""
    return text.strip(" ") in ("", "table")


def from_options(format_text: str | None, as_json: bool, schema: Schema) -> Template | None:
    """A command's ``--format`` template, None for its own output (no format, or
    ``table``), checked whatever it is (a typo is said even where ``-q`` then wins);
    refused with ``--json``, ember's own JSON (docker's spelling is ``--format json``)."""
    if not format_text:
        return None
    if as_json:
        raise UsageError("--json and --format cannot be used together",
                         hint="--format json prints docker's form: one object a line")  # fmt: skip
    template = parse(format_text, schema)
    return None if is_default(format_text) else template


def parse(text: str, schema: Schema) -> Template:
    """``text`` as a template of ``schema``'s fields; TemplateError if it is not one
    ember takes.  ``json`` alone is ``{{json .}}``; a ``table`` prefix asks for a header
    and aligned columns (``table`` alone is the caller's default: ``is_default``)."""
    if text == "json":
        return Template(schema, (_WholeJSON(),))
    if text in ("raw", "pretty"):
        raise TemplateError(f"--format {text} is not supported by {schema.command}",
                            hint="use json, table or a template")  # fmt: skip
    table = text.startswith("table")  # docker's test: a prefix ("table{{.ID}}" too)
    body = text[len("table") :] if table else text
    # as docker's CLI: spaces around it go, then \t and \n are a tab and a newline
    body = re.sub(r"\\[tn]", lambda m: "\t" if m.group() == "\\t" else "\n", body.strip(" "))
    if table and body.count("\t") > MAX_COLUMNS:  # (align() walks a column per level)
        raise TemplateError(f"bad --format: a table of more than {MAX_COLUMNS} columns")
    return Template(schema, tuple(_Parser(body, schema).nodes()), table)


class _Parser:
    """One pass over the format: text, and actions between ``{{`` and ``}}``."""

    def __init__(self, text: str, schema: Schema) -> None:
        self.text = text
        self.schema = schema
        #: where the action being read begins (what an error quotes)
        self.action = 0

    def fail(self, message: str, at: int, hint: str | None = None) -> TemplateError:
        """The error, quoting the action it is in (``at``: where in it; positions in
        the format would not be the user's once ``table`` and ``\\t`` are taken out)."""
        end = self.text.find("}}", at)
        quoted = self.text[self.action : (self.action + 60 if end == -1 else end + 2)]
        return TemplateError(f"bad --format {quoted!r}: {message}", hint=hint)

    def nodes(self) -> list[_Node]:
        out: list[_Node] = []
        at = 0
        trim_next = False
        while at <= len(self.text):
            start = self.text.find("{{", at)
            stop = self.text.find("}}", at)
            if stop != -1 and (start == -1 or stop < start):
                # Go prints a lone "}}" as text; refused here: it is a typo for an action
                self.action = max(at, stop - 20)
                raise self.fail("'}}' without its '{{'", stop)
            literal = self.text[at:] if start == -1 else self.text[at:start]
            if trim_next:
                literal = literal.lstrip(_SPACE)
            if start == -1:
                out.append(_Text(literal))
                break
            tokens, at, trim_before, trim_next = self._action(start)
            if trim_before:
                literal = literal.rstrip(_SPACE)
            out.append(_Text(literal))
            out.append(self._node(tokens, start))
        return [n for n in out if not (isinstance(n, _Text) and not n.text)]

    def _action(self, start: int) -> tuple[list[tuple[str, str, int]], int, bool, bool]:
        """The tokens of the action at ``start`` (kind, value, position), where the text
        goes on after it, and whether it trims the whitespace before and after it."""
        text, at = self.text, start + 2
        self.action = start
        if text.find("}}", at) == -1:  # ("{{.ID}": not an odd '}' in it)
            raise self.fail("'{{' without its '}}'", start)
        trim_before = text.startswith("-", at) and text[at + 1 : at + 2] in tuple(_SPACE)
        if trim_before:
            at += 1
        if text.startswith("/*", at):
            raise self.fail("comments ({{/* */}}) are not supported", start)
        tokens: list[tuple[str, str, int]] = []
        while True:
            spaced = at > start + 2 and text[at - 1] in _SPACE
            while at < len(text) and text[at] in _SPACE:
                at, spaced = at + 1, True
            if at >= len(text):
                raise self.fail("'{{' without its '}}'", start)
            if text.startswith("}}", at):
                return tokens, at + 2, trim_before, False
            if spaced and text.startswith("-}}", at):
                return tokens, at + 3, trim_before, True
            token, at = self._token(at)
            tokens.append(token)

    def _token(self, at: int) -> tuple[tuple[str, str, int], int]:
        text, c = self.text, self.text[at]
        if c == ".":
            m = _IDENT.match(text, at + 1)
            if m is None:
                return ("dot", ".", at), at + 1
            if text.startswith(".", m.end()) and _IDENT.match(text, m.end() + 1):
                raise self.fail("field chains (.A.B) are not supported", at)
            return ("field", m.group(), at), m.end()
        if c == '"':
            return self._quoted(at)
        if c == "`":
            end = text.find("`", at + 1)
            if end == -1:
                raise self.fail("unterminated raw string", at)
            return ("string", text[at + 1 : end], at), end + 1
        m = _IDENT.match(text, at)
        if m is not None:
            return ("ident", m.group(), at), m.end()
        m = _NUMBER.match(text, at)
        if m is not None:  # (an argument of docker's truncate or pad: refused by name)
            return ("number", m.group(), at), m.end()
        why = {
            "|": "pipelines (|) are not supported",
            "(": "parentheses are not supported",
            ")": "parentheses are not supported",
            "$": "variables ($x) are not supported",
        }.get(c, f"unexpected {c!r}")
        raise self.fail(why, at)

    def _quoted(self, at: int) -> tuple[tuple[str, str, int], int]:
        """A Go double-quoted string: its value and where the text goes on after it."""
        m = re.compile(r'"((?:[^"\\\n]|\\.)*)"', re.DOTALL).match(self.text, at)
        if m is None:
            raise self.fail("unterminated quoted string", at)
        try:
            value = _unquote(m.group(1))
        except ValueError as e:
            raise self.fail(f"bad escape in a quoted string: {e}", at) from None
        return ("string", value, at), m.end()

    def _node(self, tokens: list[tuple[str, str, int]], start: int) -> _Node:
        if not tokens:
            raise self.fail("empty action {{}}", start)
        kinds = [k for k, _, _ in tokens]
        kind, value, at = tokens[0]
        if kind == "ident":
            return self._call(tokens, start)
        if len(tokens) == 1 and kind == "string":
            return _Text(value)
        if kind == "dot":
            raise self.fail("{{.}} is the whole row", at, hint="use {{json .}} or a field")
        if kind != "field":
            raise self.fail("an action begins with a field or a function", at)
        self._check_field(value, at)
        if value == "Label" and self.schema.labels:
            if kinds[1:] != ["string"]:
                raise self.fail(
                    ".Label takes one quoted key", at, hint='{{.Label "com.example.key"}}'
                )
            return _Label(tokens[1][1])
        if len(tokens) > 1:
            raise self.fail(f".{value} takes no argument", tokens[1][2])
        return _Field(value)

    def _call(self, tokens: list[tuple[str, str, int]], start: int) -> _Node:
        _, name, at = tokens[0]
        if name in _KEYWORDS:
            raise self.fail(f"{name!r} is not supported (no control structures or Go built-ins)",
                            at, hint=f"ember takes the functions {', '.join(_FUNCTIONS)}")  # fmt: skip
        if name not in _FUNCTIONS:
            why = "not supported by ember" if name in _DOCKER_ONLY_FUNCTIONS else "not a function"
            raise self.fail(f"{name!r} is {why}", at,
                            hint=f"ember takes {', '.join(_FUNCTIONS)}")  # fmt: skip
        args = tokens[1:]
        if len(args) != 1:
            hint = 'a function of .Label "key" needs parentheses, which are not supported'
            raise self.fail(
                f"{name} takes one argument, got {len(args)}", at,
                hint=hint if args and args[0][1] == "Label" else f"{{{{{name} .Field}}}}",
            )  # fmt: skip
        kind, value, arg_at = args[0]
        if kind == "dot":
            if name != "json":
                raise self.fail(f"{name} takes a field, not the whole row", arg_at)
            return _WholeJSON()
        if kind != "field":
            raise self.fail(f"{name} takes a field", arg_at)
        self._check_field(value, arg_at)
        if value == "Label" and self.schema.labels:
            raise self.fail(
                f'{name} of .Label "key" needs parentheses, which are not supported', arg_at
            )
        return _Field(value, name)

    def _check_field(self, name: str, at: int) -> None:
        schema = self.schema
        if name in schema.headers or (name == "Label" and schema.labels):
            return
        if name in schema.missing:
            raise self.fail(f"{schema.command} has no .{name}: {schema.missing[name]}", at)
        known = sorted([*schema.headers, *(["Label"] if schema.labels else [])])
        near = [k for k in known if k.lower() == name.lower()]
        hint = (
            f"did you mean .{near[0]}?" if near else "fields: " + ", ".join(f".{k}" for k in known)
        )
        raise self.fail(f"unknown field .{name} for {schema.command}", at, hint=hint)


_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\", '"': '"'}  # fmt: skip


def _unquote(body: str) -> str:
    """The value of a Go interpreted string literal's ``body`` (between its quotes)."""
    out: list[str] = []
    at = 0
    while at < len(body):
        c = body[at]
        if c != "\\":
            out.append(c)
            at += 1
            continue
        kind = body[at + 1]
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
            at += 2
            continue
        digits, base = {"x": (2, 16), "u": (4, 16), "U": (8, 16)}.get(kind, (3, 8))
        start = at + 1 if base == 8 else at + 2
        code = body[start : start + digits]
        valid = "0123456789abcdefABCDEF"[: base if base == 8 else 22]
        if len(code) != digits or any(d not in valid for d in code):
            raise ValueError(f"\\{kind}")
        value = int(code, base)
        if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF or (base == 8 and value > 255):
            raise ValueError(f"\\{kind}{code}")
        out.append(chr(value))
        at = start + digits
    return "".join(out)


def _value(node: _Node, row: Row, schema: Schema) -> str:
    """A node's text in a row.  Values come from images and guests: shown ``printable``
    (a newline in one would make a fake row, an escape sequence act on the terminal)."""
    if isinstance(node, _Text):
        return node.text
    if isinstance(node, _WholeJSON):
        return _json({name: row.values[name] for name in sorted(schema.headers)})
    if isinstance(node, _Label):
        return printable(row.labels.get(node.key, ""))
    value = row.values[node.name]
    if node.function == "json":
        return _json(value)
    if node.function == "upper":
        value = value.upper()
    elif node.function == "lower":
        value = value.lower()
    elif node.function == "title":
        value = _title(value)
    return printable(value)


def _header(node: _Node, schema: Schema) -> str:
    """A node's text in a table's header: a field's column name whatever function is
    applied to it (docker's header functions leave it as it is)."""
    if isinstance(node, _Text):
        return node.text
    if isinstance(node, _Field):
        return schema.headers[node.name]
    if isinstance(node, _Label):
        # docker's: the key's last dot-separated part, '-' and '_' as spaces
        return node.key.rsplit(".", 1)[-1].replace("-", " ").replace("_", " ")
    return ""  # {{json .}}: no one column name (docker's header stops there)


def _json(value: object) -> str:
    """Compact JSON, non-ASCII as it is (Go's encoder, HTML not escaped), but every
    character a terminal would not print as text written as an escape (JSON's own
    escapes, valid wherever it occurs: only in strings)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return "".join(c if c.isprintable() else _json_escape(c) for c in text)


def _json_escape(c: str) -> str:
    code = ord(c)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _title(text: str) -> str:
    """Go's ``strings.Title`` (docker's ``title``): the first letter of each word upper
    case, the others left as they are (Python's ``str.title`` lowers them)."""
    out: list[str] = []
    after_separator = True
    for c in text:
        upper = c.upper()
        out.append(upper if after_separator and len(upper) == 1 else c)
        after_separator = _go_separator(c)
    return "".join(out)


def _go_separator(c: str) -> bool:
    """Go's word boundary for ``strings.Title``."""
    if c.isascii():
        return not (c.isalnum() or c == "_")
    if c.isalpha() or c.isdigit():
        return False
    return c.isspace()


def align(text: str) -> str:
    """``text``'s tab-separated cells in columns, as docker's tables (Go's ``tabwriter``,
    minimum width 10, padding 3): a column is a run of lines that have a cell there
    ended by a tab; its cells are padded to its widest plus 3; a line's last cell (no
    tab after it) is not part of any column."""
    lines = [line.split("\t") for line in text.split("\n")]
    out: list[str] = []
    _format(lines, 0, len(lines), [], out)
    return "\n".join(out)


def _format(
    lines: list[list[str]], first: int, end: int, widths: list[int], out: list[str]
) -> None:
    """Lines ``first`` to ``end`` with the widths of the columns left of ``widths``' end
    known; a block of lines with a cell in the next column gets that column's width."""
    column = len(widths)
    at = first
    while at < end:
        if column >= len(lines[at]) - 1:  # no tab-ended cell in this column
            at += 1
            continue
        _write(lines[first:at], widths, out)
        block = at
        width = _MIN_WIDTH
        while at < end and column < len(lines[at]) - 1:
            width = max(width, len(lines[at][column]) + _PADDING)
            at += 1
        _format(lines, block, at, [*widths, width], out)
        first = at
    _write(lines[first:end], widths, out)


def _write(lines: list[list[str]], widths: list[int], out: list[str]) -> None:
    for cells in lines:
        out.append(
            "".join(c.ljust(widths[i]) if i < len(widths) else c for i, c in enumerate(cells))
        )
