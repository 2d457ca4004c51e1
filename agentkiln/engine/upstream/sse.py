"""Server-sent events as OpenAI-compatible servers stream them, parsed just enough for chat chunks.

aiohttp and httpx give bytes as they arrive but no SSE parser. Lines are kept batched per network
read so a streaming proxy can forward what arrived together in one write instead of one write
per token event, which is most of a stream's cost when the upstream is fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

DONE = b"[DONE]"


async def line_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """Complete lines (without line ends) of a byte stream, one list per chunk that completed any."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        *complete, buf = buf.split(b"\n")
        if complete:
            yield [line.rstrip(b"\r") for line in complete]
    if buf:
        yield [buf.rstrip(b"\r")]


def data_payloads(batch: list[bytes]) -> tuple[list[bytes], bool]:
    """The `data:` payloads of a batch of lines up to `data: [DONE]`, and whether it was seen.

    OpenAI-style streams put one JSON chunk on each `data:` line; comments (`:`), `event:`,
    `id:` and blank separator lines carry nothing a chat result needs.
    """
    payloads = []
    for line in batch:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == DONE:
            return payloads, True
        payloads.append(payload)
    return payloads, False
