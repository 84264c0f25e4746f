"""logfmt_value (aggregator/logs.py): its fast paths write what the rule of docs/operations.md
says, checked against that rule written the plain way (a regular expression)."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aggregator.logs import escaped, logfmt_value

_NEEDS_QUOTES = re.compile(r'[ ="\\]')


def _by_the_rule(value: Any) -> str:
    text = str(value)
    if text and text.isprintable() and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + escaped(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


@given(st.text() | st.integers() | st.floats() | st.booleans())
def test_a_value_is_written_as_the_rule_says(value):
    assert logfmt_value(value) == _by_the_rule(value)


def test_values_that_must_be_quoted_or_escaped_are():
    assert logfmt_value("") == '""'
    assert logfmt_value("a b=c") == '"a b=c"'
    assert logfmt_value('say "hi"') == '"say \\"hi\\""'
    assert logfmt_value("back\\slash") == '"back\\\\slash"'
    assert logfmt_value("\x1b[31mred") == '"\\x1b[31mred"'
    assert logfmt_value("line\u2028two") == '"line\\u2028two"'
    assert logfmt_value(21.3) == "21.3"
    assert logfmt_value(float("nan")) == "nan"
    assert logfmt_value(True) == "True"
