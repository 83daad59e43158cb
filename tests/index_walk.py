"""Walking a call index page by page, as `GET /tasks` does (the index tests of each backend)."""

from __future__ import annotations

from taskbridge._ledger import CallIndex, Cursor, IndexEntry, merge_pages


async def walk(index: CallIndex, limit: int, **filters: str | None) -> list[IndexEntry]:
    """Every entry, page by page from the newest, as `GET /tasks` goes (through merge_pages)."""
    seen: list[IndexEntry] = []
    after: Cursor | None = None
    for _ in range(10_000):
        page = await index.page(
            state=filters.get("state"), task=filters.get("task"), after=after, limit=limit
        )
        entries, after = merge_pages([page], limit)
        seen += entries
        if after is None:
            return seen
    raise AssertionError("the walk did not end")
