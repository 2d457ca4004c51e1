"""Incremental detokenization: text of a growing token sequence at O(1) decode work per token.

Re-decoding the whole sequence for every new token is quadratic in its length. Like vLLM's
`detokenize_incrementally` (and TGI's `decode_token`), this keeps two offsets into the ids:
`prefix_offset..read_offset` is a short window already turned into text, kept as left context
(tokenizers that drop a leading space or merge bytes need it), and every new token decodes only
`prefix_offset..end`; the new text is what that window adds beyond the prefix window's text.

Multi-byte characters: a byte-level / byte-fallback token may carry part of a character, which
decodes to U+FFFD. Such text is held back (`pending`) until a later token completes it, so the
committed text never contains a half character. A genuine U+FFFD (invalid bytes that never
complete) is released after `max_pending` tokens, which also bounds the window.

Special tokens are dropped before decoding when `skip_special_tokens` (decoding skips them anyway),
so they never sit in a window.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; `text` is always a prefix of `tokenizer.decode(all ids)`."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True, max_pending: int = 8) -> None:
        self._decode = tokenizer.decode
        self._skip = skip_special_tokens
        self._special = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        self._max_pending = max_pending
        self._ids: list[int] = []  # ids that carry text (special ones dropped)
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._chunks: list[str] = []
        self._text: str | None = ""
        self.pending = ""  # decoded text of ids after read_offset (may end in a partial character)

    @property
    def text(self) -> str:
        """Committed text so far (joined lazily)."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token; return the text it commits ("" while a character is incomplete)."""
        if token_id in self._special:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        grew = len(window) > len(self._prefix_text) and window.startswith(self._prefix_text)
        new = window[len(self._prefix_text) :] if grew else ""
        forced = len(self._ids) - self._read_offset >= self._max_pending
        if not forced and (not grew or new.endswith(_REPLACEMENT)):
            self.pending = new
            return ""
        if not grew and window != self._prefix_text:
            # The window rewrote its left context (not seen with byte-level BPE): fall back to an
            # exact diff against everything committed so far.
            full = self._decode(self._ids, skip_special_tokens=self._skip)
            new = full[len(self.text) :] if full.startswith(self.text) else ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        self.pending = ""
        if new:
            self._chunks.append(new)
            self._text = None
        return new


def _special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return frozenset(int(i) for i in ids)
