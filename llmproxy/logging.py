"""
Log setup: level from C{LOG_LEVEL}, format from C{LOG_FORMAT}.

Under C{twistd} the observer built here is handed to twistd through the
application's L{ILogObserver} component (see L{llmproxy.service}); under
C{twist} its own C{--log-format}/C{--log-level} options apply.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

from llmproxy.reopen import ReopenableFile

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


@implementer(ILogObserver)
class CompactJSONObserver:
    """
    One JSON object per line: C{ts}, C{level}, C{msg}, C{namespace}, then the
    event's own structured fields (those a format string named or passed).
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        ts = event.get("log_time")
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(ts or 0, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": level.name if level is not None else "info",
            "msg": formatEvent(event),
            "namespace": event.get("log_namespace", ""),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in ("message", "format", "time", "isError", "system"):
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                out[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            out["error"] = failure.getTraceback()
        try:
            self._stream.write(json.dumps(out, default=str) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass


#: Library chatter that is only interesting when debugging: reconnection
#: attempts of Redis clients (every second while Redis is down, per
#: connection) and persistent connections closing. llmproxy logs one line of
#: its own, rate-limited, when a dependency goes away and when it returns.
_CHATTY_NAMESPACES = frozenset({"twisted.application._client_service.ClientService"})
_CHATTY_TEXT = ("Discarding dead connection.",)


@implementer(ILogFilterPredicate)
class DemoteChatter:
    """Show the chatter above only at C{LOG_LEVEL=debug}."""

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if event.get("log_level") not in (LogLevel.info, LogLevel.debug):
            return PredicateResult.maybe
        if event.get("log_namespace") in _CHATTY_NAMESPACES:
            return PredicateResult.no
        text = event.get("log_text") or event.get("log_format")
        if text in _CHATTY_TEXT:
            return PredicateResult.no
        return PredicateResult.maybe


def make_observer(
    level: str, fmt: str, stream: IO[str] | ReopenableFile | None = None
) -> ILogObserver:
    out: Any = stream if stream is not None else sys.__stdout__
    assert out is not None
    base: ILogObserver = CompactJSONObserver(out) if fmt == "json" else textFileLogObserver(out)
    predicates: list[ILogFilterPredicate] = [
        LogLevelFilterPredicate(defaultLogLevel=_LEVELS.get(level, LogLevel.info))
    ]
    if level != "debug":
        predicates.insert(0, DemoteChatter())
    return FilteringLogObserver(base, predicates)


def open_log_stream(path: str) -> ReopenableFile | None:
    """C{LOG_FILE}, opened for appending (None: standard output)."""
    if not path or path == "-":
        return None
    return ReopenableFile(path, "a", encoding="utf-8", buffering=1)
