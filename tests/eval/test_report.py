"""Report formatting: numbers that may be missing (NaN in memory, null once read back from a JSON file)."""

from __future__ import annotations

import math

from retrolm.eval.report import change, fmt, markdown_table


def test_a_gain_is_shown_as_the_change_in_bits_per_byte_and_a_missing_one_as_a_dash():
    assert change(0.03) == "-3.0%" and change(-0.125) == "+12.5%" and change(0.0) == "-0.0%"
    assert change(None) == change(math.nan) == "–"
    assert fmt(None) == fmt(math.nan) == "–" and fmt(1234) == "1,234" and fmt(0.5, 2) == "0.50"
    assert markdown_table(["a", "b"], [["x", None]]).splitlines()[-1] == "| x | – |"
