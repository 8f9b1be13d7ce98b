"""docker's ``--format`` templates, the subset ember takes (``ember.cli.goformat``)."""

from __future__ import annotations

import json

import pytest

from ember.cli.goformat import Row, Schema, TemplateError, align, from_options, is_default, parse
from ember.errors import UsageError

SCHEMA = Schema(
    "ember ps",
    {"ID": "MACHINE ID", "Names": "NAMES", "Image": "IMAGE", "Status": "STATUS"},
    labels=True,
    missing={"Size": "not measured"},
)
ROWS = [
    Row(
        {"ID": "0123456789ab", "Names": "web", "Image": "busybox", "Status": "Up 2 hours"},
        {"com.example.tier-name": "front", "app": "web"},
    ),  # fmt: skip
    Row({"ID": "ba9876543210", "Names": "db", "Image": "postgres:16", "Status": "Exited (0)"}),
]


def render(text: str, rows: list[Row] = ROWS) -> str:
    return parse(text, SCHEMA).render(rows)


def test_fields_and_literal_text() -> None:
    assert render("{{.Names}}") == "web\ndb\n"
    assert (
        render("name={{.Names}} id={{ .ID }}!")
        == "name=web id=0123456789ab!\nname=db id=ba9876543210!\n"
    )
    assert render("plain") == "plain\nplain\n"
    assert render("{{.Names}}", []) == ""


def test_tab_and_newline_escapes_as_dockers_cli() -> None:
    """The two characters \\t and \\n of the format are a tab and a newline (docker's CLI
    replaces them before Go reads the template); spaces around the format go."""
    assert render("{{.Names}}\\t{{.ID}}\\n") == "web\t0123456789ab\n\ndb\tba9876543210\n\n"
    assert render("  {{.Names}}  ") == "web\ndb\n"
    assert render("a\\\\tb") == "a\\\tb\na\\\tb\n"  # (docker's replacer: the first \ stays)


def test_json_of_the_row_and_of_a_field() -> None:
    lines = render("json").splitlines()
    assert [json.loads(line) for line in lines] == [dict(r.values) for r in ROWS]
    assert lines[0] == (
        '{"ID":"0123456789ab","Image":"busybox","Names":"web","Status":"Up 2 hours"}'
    )
    assert render("{{json .}}") == render("json")
    assert render("{{json .Names}}") == '"web"\n"db"\n'
    assert parse("json", SCHEMA).fields == frozenset(SCHEMA.headers)


def test_json_keeps_text_but_escapes_what_a_terminal_would_act_on() -> None:
    row = Row({"ID": "x", "Names": "é<&>\x1b[2J\u202e\U000e0001\x7f", "Image": "", "Status": ""})
    out = render("{{json .Names}}", [row])
    assert out == '"é<&>\\u001b[2J\\u202e\\udb40\\udc01\\u007f"\n'
    assert json.loads(out) == row.values["Names"]


def test_values_are_printable_literals_are_not() -> None:
    """A value from an image or a guest with a newline made a fake row, a tab a fake
    column; the format's own tabs and newlines are the user's."""
    row = Row({"ID": "x", "Names": "a\nb\tc\x1b[2J", "Image": "", "Status": ""})
    assert render("{{.Names}}\\t|", [row]) == "a\\nb\\tc\\x1b[2J\t|\n"


def test_functions() -> None:
    row = Row({"ID": "x", "Names": "hELLO wORLD-x_y", "Image": "ÉCOLE", "Status": ""})
    assert render("{{upper .Names}}", [row]) == "HELLO WORLD-X_Y\n"
    assert render("{{lower .Image}}", [row]) == "école\n"
    # Go's strings.Title: first letters up, the rest as they are ("_" joins a word)
    assert render("{{title .Names}}", [row]) == "HELLO WORLD-X_y\n"
    assert render('{{"a \\"quoted\\" \\x41\\u00e9\\101"}}{{`raw`}}', [row]) == 'a "quoted" AéAraw\n'
    # docker's \n replacement comes first: in a raw string too
    assert render("{{`a\\nb`}}", [row]) == "a\nb\n"


def test_label_and_its_header() -> None:
    assert render('{{.Label "app"}}|{{.Label "nosuch"}}') == "web|\n|\n"
    table = render('table {{.Names}}\\t{{.Label "com.example.tier-name"}}').splitlines()
    assert table == ["NAMES     tier name", "web       front", "db        "]


def test_trim_markers() -> None:
    assert render("a  {{- .Names -}}  \\n  b") == "awebb\nadbb\n"
    assert render("a {{-.Names}}".replace("-.", "- .")) == "aweb\nadb\n"


def test_table_header_and_columns_as_dockers_tabwriter() -> None:
    """Cells padded to the widest of their column plus 3, at least 10; the last cell of
    a line is no column; functions leave the header as it is (docker's)."""
    out = render("table {{.ID}}\\t{{upper .Names}}\\t{{json .Image}}\\t{{.Status}}")
    assert out == (
        "MACHINE ID     NAMES     IMAGE           STATUS\n"
        '0123456789ab   WEB       "busybox"       Up 2 hours\n'
        'ba9876543210   DB        "postgres:16"   Exited (0)\n'
    )
    assert render("table {{.Names}}", []) == "NAMES\n"  # the header even with no rows
    assert (
        render("table{{.Names}}: {{.ID}}")
        == "NAMES: MACHINE ID\nweb: 0123456789ab\ndb: ba9876543210\n"
    )
    assert render("table {{json .}}", ROWS[:1]).splitlines()[0] == ""


def test_align_blocks_as_tabwriter() -> None:
    """A column's width is that of a run of lines with a cell there: a line without one
    ends the run."""
    assert align("a\tb\tc\nlonger-cell\td\n") == (
        "a" + " " * 13 + "b" + " " * 9 + "c\n" + "longer-cell" + " " * 3 + "d\n"
    )
    assert align("abc\tx\nno tabs here at all\nab\ty\n") == (
        "abc       x\nno tabs here at all\nab        y\n"
    )
    assert align("a\t\n") == "a         \n"  # an empty last cell: the padding stays


def test_default_table_and_options() -> None:
    assert is_default("table") and is_default("") and is_default(" table ")
    assert not is_default("table {{.ID}}") and not is_default("json")
    assert from_options(None, False, SCHEMA) is None
    assert from_options("table", False, SCHEMA) is None
    assert from_options("json", False, SCHEMA) is not None
    with pytest.raises(UsageError, match="--json and --format cannot be used together"):
        from_options("json", True, SCHEMA)
    with pytest.raises(TemplateError):
        from_options("{{.Nope}}", False, SCHEMA)


def test_fields_used() -> None:
    assert parse('{{.ID}} {{upper .Names}} {{.Label "x"}}', SCHEMA).fields == {"ID", "Names"}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{{.Nope}}", "unknown field .Nope for ember ps"),
        ("{{.names}}", "did you mean .Names?"),
        ("{{.Size}}", "ember ps has no .Size: not measured"),
        ("{{.ID", "'{{' without its '}}'"),
        ("{{.ID}", "'{{' without its '}}'"),
        ("{{.ID}}{{.Names", "'{{' without its '}}'"),
        ("{{.ID}} }}", "'}}' without its '{{'"),
        ("{.ID}}", "'}}' without its '{{'"),
        ("{{}}", "empty action"),
        ("{{.}}", "{{.}} is the whole row"),
        ("{{.ID | upper}}", "pipelines (|) are not supported"),
        ("{{upper (.ID)}}", "parentheses are not supported"),
        ("{{$x := .ID}}", "variables ($x) are not supported"),
        ("{{if .ID}}x{{end}}", "'if' is not supported"),
        ("{{range .Names}}{{end}}", "'range' is not supported"),
        ('{{printf "%s" .ID}}', "'printf' is not supported"),
        ("{{/* note */}}", "comments"),
        ('{{join .Names ","}}', "'join' is not supported by ember"),
        ("{{truncate .Names 3}}", "'truncate' is not supported by ember"),
        ("{{shout .Names}}", "'shout' is not a function"),
        ("{{json}}", "json takes one argument, got 0"),
        ("{{upper .ID .Names}}", "upper takes one argument, got 2"),
        ("{{upper .}}", "upper takes a field, not the whole row"),
        ('{{upper "x"}}', "upper takes a field"),
        ('{{json .Label "x"}}', "needs parentheses"),
        ("{{json .Label}}", "needs parentheses"),
        ("{{.Label}}", ".Label takes one quoted key"),
        ("{{.Label app}}", ".Label takes one quoted key"),
        ('{{.ID "x"}}', ".ID takes no argument"),
        ("{{.ID.Short}}", "field chains"),
        ('{{"open}}', "unterminated quoted string"),
        ("{{`open}}", "unterminated raw string"),
        ('{{"\\q"}}', "bad escape"),
        ('{{"\\xZZ"}}', "bad escape"),
        ("{{.ID-}}", "unexpected '-'"),
        ("{{3}}", "an action begins with a field or a function"),
        ("{{.ID 3}}", ".ID takes no argument"),
        ("{{.ID @}}", "unexpected '@'"),
        ('{{"a" .ID}}', "an action begins with a field or a function"),
        ("raw", "--format raw is not supported by ember ps"),
    ],
)
def test_refused_with_one_line_and_exit_code_2(text: str, says: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse(text, SCHEMA)
    message = str(caught.value)
    assert says in message and "\n" not in message
    assert caught.value.exit_code == 2


def test_label_is_unknown_where_the_listing_has_no_labels() -> None:
    schema = Schema("ember image ls", {"ID": "IMAGE ID"})
    with pytest.raises(TemplateError, match=r"unknown field \.Label"):
        parse('{{.Label "x"}}', schema)


def test_a_table_of_too_many_columns_is_refused() -> None:
    """~1000 tab-separated cells ended in a RecursionError (a traceback), rows or not."""
    from ember.cli.goformat import MAX_COLUMNS

    schema = Schema("ember ps", {"ID": "ID"})
    with pytest.raises(TemplateError, match=f"more than {MAX_COLUMNS} columns"):
        parse("table " + "{{.ID}}\\t" * 1000, schema)
    wide = parse("table " + "{{.ID}}\\t" * MAX_COLUMNS, schema)
    assert wide.render([Row({"ID": "x"})]).count("\n") == 2
