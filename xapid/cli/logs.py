"""Log set-up for the daemon: one line per event on a text stream, filtered by level."""

from __future__ import annotations

from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver,
)


def start_logging(stream: TextIO, level: str = "info", journal: bool | None = None) -> None:
    """Log to *stream*; for journald (*journal*, default: ``$JOURNAL_STREAM`` set, i.e. stderr is the
    journal under systemd) without timestamps and with each line's priority as a ``<N>`` prefix."""
    global _predicate
    import os

    if journal is None:
        journal = bool(os.environ.get("JOURNAL_STREAM"))
    predicate = _predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    base = journal_observer(stream) if journal else textFileLogObserver(stream)
    observer = FilteringLogObserver(base, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)



_predicate: LogLevelFilterPredicate | None = None


def set_log_level(level: str) -> None:
    """Change the level of the running daemon's log (SIGHUP reload)."""
    if _predicate is not None:
        _predicate.setLogLevelForNamespace(None, LogLevel.levelWithName(level))  # type: ignore[arg-type]


#: syslog priorities journald reads from a ``<N>`` line prefix (sd-daemon.h)
_PRIORITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2}


def journal_observer(stream: TextIO) -> Any:
    """One line per event, ``<priority>`` first and no timestamp: journald adds its own."""
    from twisted.logger import formatEvent

    def observe(event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        priority = _PRIORITY.get(event.get("log_level", LogLevel.info), 6)
        lines = text.rstrip("\n").split("\n")
        stream.write("".join(f"<{priority}>{line}\n" for line in lines))
        stream.flush()

    return observe
