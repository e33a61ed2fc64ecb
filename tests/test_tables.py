"""The one Markdown table renderer."""

import pytest

from attnlab.tables import markdown_table


def test_rows_under_a_header_and_separator():
    text = markdown_table(["a", "b"], [["1", "x|y"], ["2", ""]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| 2 |  |"]


def test_a_row_of_the_wrong_width_is_an_error():
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])
