"""Paged list replies: a list larger than one protocol frame still gets across.

Every reply is one frame, and frames are bounded (4 MiB by default) so that no peer can
make another allocate without limit. A namespace with many large records (containers carry
their whole OCI spec) can outgrow that. A client that asks for pages (`page: {}` in the
params, then `page: {after: NEXT}`) gets the items in key order, as many as fit
`PAGE_BYTES`, and `next` (the key to continue after, or None at the end). A client that
does not ask gets the whole list in one reply, as before.

Pages are read from the current state each time: an item created or removed between two
pages may or may not appear, as with any cursor over live data; none appears twice.
"""

from __future__ import annotations

from berth.shim.wire.protocol import encode  # msgpack, loaded on use: the CLI imports this

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the CLI pays for it
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator
    from typing import Any

PAGE_BYTES = 3 * 1024 * 1024  # below the 4 MiB frame, with room for the reply around it


def paged(field: str, items: list[dict[str, Any]], key: str, page: Any) -> Any:
    """The reply {field: items}, or one page of it if the client asked for pages (`page`
    not None: an object whose `after` is where to continue, None for the first page)."""
    if page is None:
        return {field: items}
    after = page.after
    out: list[dict[str, Any]] = []
    size = 0
    # item[key], not .get: a list paged by a field its items lack (snapshots were) sorts
    # nothing and stops after one page; that is a bug to fail loudly, not a short list
    for item in sorted(items, key=lambda i: str(i[key])):
        name = str(item[key])
        if after is not None and name <= after:
            continue
        cost = len(encode(item))
        if out and size + cost > PAGE_BYTES:
            return {field: out, "next": str(out[-1][key])}
        out.append(item)
        size += cost
    return {field: out, "next": None}


def all_pages(
    call: Callable[[str, dict[str, Any]], Any], method: str, field: str, params: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Every item of a paged list, through a blocking `call(method, params)`."""
    after: str | None = None
    while True:
        reply = call(method, {**params, "page": {} if after is None else {"after": after}})
        yield from reply.get(field) or []
        after = reply.get("next")
        if not after:
            return


async def all_pages_async(
    call: Callable[[str, dict[str, Any]], Awaitable[Any]],
    method: str,
    field: str,
    params: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every item of a paged list, through an async `call(method, params)`."""
    items: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        reply = await call(method, {**params, "page": {} if after is None else {"after": after}})
        items.extend(reply.get(field) or [])
        after = reply.get("next")
        if not after:
            return items
