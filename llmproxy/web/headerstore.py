"""
Filling Twisted L{Headers} with names and values already known to be valid.

C{Headers.setRawHeaders} checks and canonicalises the name and rewrites
every value for line breaks on each call. On the proxy's path most headers
are set from values that were checked once already (the upstream's
response head, the proxy's own constants), some twenty per request, and
that repeated checking was a tenth of the proxy's CPU.

L{set_clean} and L{add_clean} store such headers directly in the
L{Headers} object's table, under the name Twisted itself would use (found
once per distinct name by asking Twisted, so its validation and spelling
rules apply). At import it checks that this Twisted keeps headers the way
this module expects; if not, both functions fall back to the public
methods.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.web.http_headers import Headers


def _table(headers: Headers) -> dict[bytes, list[bytes]] | None:
    table = getattr(headers, "_rawHeaders", None)
    return table if isinstance(table, dict) else None


def _works() -> bool:
    probe = Headers()
    probe.setRawHeaders(b"x-probe-name", [b"1"])
    probe.addRawHeader(b"X-PROBE-NAME", b"2")
    table = _table(probe)
    if table is None or len(table) != 1:
        return False
    (key, values), *_ = table.items()
    if values != [b"1", b"2"]:
        return False
    check = Headers()
    check_table = _table(check)
    if check_table is None:
        return False
    check_table[key] = [b"3"]
    return check.getRawHeaders(b"x-probe-name") == [b"3"] and list(check.getAllRawHeaders()) == [
        (key, [b"3"])
    ]


#: Whether the direct path is used (False: the public methods).
DIRECT = _works()

_names: dict[bytes, bytes] = {}

#: Distinct names remembered (upstreams send a few dozen; this bounds a hostile one).
MAX_NAMES = 10_000


def stored_name(name: bytes) -> bytes:
    """The key Twisted files C{name} under; raises its C{ValueError} for an invalid name."""
    key = _names.get(name)
    if key is None:
        probe = Headers()
        probe.setRawHeaders(name, [])
        table = _table(probe)
        assert table is not None
        (key,) = table
        if len(_names) < MAX_NAMES:
            _names[name] = key
    return key


def set_clean(headers: Headers, name: bytes, values: Sequence[bytes]) -> None:
    """C{headers.setRawHeaders(name, values)} for values without line breaks."""
    table = _table(headers) if DIRECT else None
    if table is None:
        headers.setRawHeaders(name, values)
        return
    table[stored_name(name)] = list(values)


def add_clean(headers: Headers, name: bytes, value: bytes) -> None:
    """C{headers.addRawHeader(name, value)} for a value without line breaks."""
    table = _table(headers) if DIRECT else None
    if table is None:
        headers.addRawHeader(name, value)
        return
    key = stored_name(name)
    values = table.get(key)
    if values is None:
        table[key] = [value]
    else:
        values.append(value)
