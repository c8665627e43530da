"""
Which address a request comes from.

Without C{TRUSTED_PROXIES} this is the reference's rule: the first
C{X-Forwarded-For} entry, else C{X-Real-IP}, else the peer. Any client can
write those headers, and load balancers that append to C{X-Forwarded-For}
keep what the client sent in front, so that rule lets a client pick its own
address, and with it its own C{IP_RATE_LIMIT} counter.

With C{TRUSTED_PROXIES} only what the listed proxies vouch for counts: a
peer that is not one of them is the client, whatever it sent; behind them,
C{X-Forwarded-For} is read from the right (the entry the nearest proxy
added) past every trusted address, and the first other one is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import UNIXAddress

#: In C{TRUSTED_PROXIES}: connections over a UNIX socket come from a trusted proxy.
UNIX = "unix"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_trusted_entry(entry: str) -> _Network | str:
    """An address, a network in CIDR notation or C{unix}; ValueError otherwise."""
    if entry.lower() == UNIX:
        return UNIX
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(
            f"not an address, a network (CIDR) or {UNIX!r}: {entry!r}"
            " (example: 10.0.0.0/8,127.0.0.1)"
        ) from None


def _address(hop: str) -> str:
    """
    An X-Forwarded-For entry without the port some proxies add
    (C{198.51.100.4:52113}, C{[2001:db8::1]:52113}): with it, every new
    connection of one client would look like another client.
    """
    if hop.startswith("["):
        return hop[1:].split("]", 1)[0]
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop


class TrustedProxies:
    """The proxies whose C{X-Forwarded-For} and C{X-Real-IP} are believed."""

    #: Verdicts kept per address (the same few proxies ask again and again).
    MAX_REMEMBERED = 4096

    def __init__(self, entries: Iterable[str]) -> None:
        parsed = [parse_trusted_entry(e) for e in entries]
        self.unix = UNIX in parsed
        self.networks = tuple(p for p in parsed if not isinstance(p, str))
        self._verdicts: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is None:
            verdict = self._trusts(address)
            if len(self._verdicts) >= self.MAX_REMEMBERED:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict

    def _trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client_of(self, request: Any) -> str:
        peer = request.getClientAddress()
        if isinstance(peer, UNIXAddress):
            if not self.unix:
                return ""
        else:
            host = getattr(peer, "host", "") or ""
            if not self.trusts(host):
                return host
        headers = request.requestHeaders
        hops = [
            _address(hop.strip().decode("latin-1"))
            for value in headers.getRawHeaders(b"x-forwarded-for") or ()
            for hop in value.split(b",")
        ]
        for hop in reversed(hops):
            if hop and not self.trusts(hop):
                return hop
        if hops and hops[0]:
            return hops[0]  # every hop is a trusted proxy: the farthest one
        real = (headers.getRawHeaders(b"x-real-ip") or [b""])[-1].strip()
        if real:
            return real.decode("latin-1")
        return "" if isinstance(peer, UNIXAddress) else host
