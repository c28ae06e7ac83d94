"""Keyset pages, as every list endpoint answers them (Stripe's `has_more`)."""

from __future__ import annotations

from typing import Any


def keyset_page(rows: list[Any], limit: int, backwards: bool) -> tuple[list[Any], bool]:
    """`rows` as a repository read them: one more than `limit` (so the extra one says there is
    more), newest first, or oldest first when paging `backwards` (`ending_before`). Returns the
    page newest first, and `has_more`."""
    page = rows[:limit]
    if backwards:
        page.reverse()
    return page, len(rows) > limit
