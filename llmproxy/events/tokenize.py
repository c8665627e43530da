"""
Offline token counting for usage estimates, with the vocabularies that ship
inside the C{bpe-openai} package (nothing is downloaded at run time).

Loading a vocabulary takes about a second the first time: call
L{warm_up} from a thread at startup so the first estimate does not stall
the reactor.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

O200K = "o200k_base"
CL100K = "cl100k_base"

_lock = threading.Lock()
_tokenizers: dict[str, Any] = {}


def encoding_for_model(model: str | None) -> str:
    """C{o200k_base} for gpt-4o, gpt-4.1, o1/o3/o4 and "omni" models; else C{cl100k_base}."""
    name = (model or "").lower()
    if "/" in name:
        name = name.rsplit("/", 1)[1]
    if (
        "gpt-4o" in name
        or "gpt-4.1" in name
        or "gpt-5" in name
        or "omni" in name
        or name.startswith(("o1", "o3", "o4", "chatgpt-4o"))
    ):
        return O200K
    return CL100K


def _tokenizer(encoding: str) -> Any:
    tokenizer = _tokenizers.get(encoding)
    if tokenizer is not None:
        return tokenizer
    with _lock:
        tokenizer = _tokenizers.get(encoding)
        if tokenizer is None:
            with warnings.catch_warnings():
                # bpe_openai's package init uses a deprecated importlib.resources call.
                warnings.simplefilter("ignore", DeprecationWarning)
                from bpe_openai._bindings import tokenizer_for_encoding

                tokenizer = tokenizer_for_encoding(encoding)
            _tokenizers[encoding] = tokenizer
    return tokenizer


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens of C{text} in the encoding of C{model}."""
    if not text:
        return 0
    return int(_tokenizer(encoding_for_model(model)).count(text))


def warm_up() -> None:
    """Load both vocabularies (blocking: run it in a thread)."""
    for encoding in (CL100K, O200K):
        _tokenizer(encoding)
