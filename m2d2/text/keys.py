"""Caption keys: which captions count as "the same" and are therefore embedded once.

AudioSet-style captions ("The sound of Speech, Music") repeat hundreds of thousands of times, often differing
only in case or spacing. :func:`normalize_caption` defines exactly what is folded together:

1. Unicode NFKC (compatibility forms: full-width letters, ligatures, non-breaking and other odd spaces become
   their plain equivalents);
2. lower case (``str.lower``);
3. every run of whitespace (``str.split``: spaces, tabs, newlines, any Unicode space) becomes one space, and
   leading/trailing whitespace is removed.

Nothing else is touched: punctuation, digits, accents and word order stay, so "The sound of a dog." and
"The sound of a dog" are two captions. The key is BLAKE2b-128 of the normalised UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable

NORMALIZATION = "nfkc-lower-ws-v1"  # stored with every cache; bump if normalize_caption changes


def normalize_caption(text: str) -> str:
    """The form two captions must share to be embedded once (see the module docstring)."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def caption_key(text: str) -> bytes:
    """16-byte key of a caption after :func:`normalize_caption`."""
    return hashlib.blake2b(normalize_caption(text).encode("utf-8"), digest_size=16).digest()


def caption_hash(text: str) -> str:
    """Stable 128-bit hex hash of a caption's exact UTF-8 bytes (no normalisation; legacy cache key)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def unique_captions(captions: Iterable[str]) -> dict[bytes, str]:
    """``key -> representative`` for every distinct normalised caption.

    The representative (the text actually embedded) is the smallest original spelling, so the result depends
    only on the set of captions, not on their order; a corpus without case/space variants embeds its captions
    exactly as written.
    """
    best: dict[bytes, str] = {}
    seen: set[str] = set()  # repeats of the exact same text skip normalising and hashing
    for text in captions:
        if text in seen:
            continue
        seen.add(text)
        key = caption_key(text)
        if key not in best or text < best[key]:
            best[key] = text
    return best
