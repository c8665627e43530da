"""
Offline token counting for usage estimates, with the vocabularies that ship
inside the C{bpe-openai} package (nothing is downloaded at run time).

Only the package's compiled tokenizer is loaded, not its Python
package (whose import decodes every vocabulary in Python: a second and
60 MB more). A vocabulary is loaded the first time a model needs it
(cl100k: 0.04 s and 30 MB; o200k: 0.1 s and 65 MB), so a proxy whose
providers always report usage never pays for it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
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


_bindings: Any = None


def _load_bindings() -> Any:
    """C{bpe_openai._bindings} without running C{bpe_openai/__init__.py}."""
    spec = importlib.util.find_spec("bpe_openai")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for directory in locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(directory, "_bindings" + suffix)
            if os.path.exists(path):
                loader = importlib.machinery.ExtensionFileLoader("bpe_openai._bindings", path)
                module_spec = importlib.util.spec_from_file_location(
                    "bpe_openai._bindings", path, loader=loader
                )
                if module_spec is not None:
                    module = importlib.util.module_from_spec(module_spec)
                    loader.exec_module(module)
                    return module
    with warnings.catch_warnings():
        # bpe_openai's package init uses a deprecated importlib.resources call.
        warnings.simplefilter("ignore", DeprecationWarning)
        from bpe_openai import _bindings as fallback

        return fallback


def _tokenizer(encoding: str) -> Any:
    tokenizer = _tokenizers.get(encoding)
    if tokenizer is not None:
        return tokenizer
    with _lock:
        tokenizer = _tokenizers.get(encoding)
        if tokenizer is None:
            global _bindings
            if _bindings is None:
                _bindings = _load_bindings()
            tokenizer = _bindings.tokenizer_for_encoding(encoding)
            _tokenizers[encoding] = tokenizer
    return tokenizer


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens of C{text} in the encoding of C{model}."""
    if not text:
        return 0
    return int(_tokenizer(encoding_for_model(model)).count(text))
