"""Log set-up for the daemon: one line per event on a text stream, filtered by level."""

from __future__ import annotations

from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver,
)


def start_logging(stream: TextIO, level: str = "info", journal: bool | None = None,
                  log_file: str = "", log_file_bytes: int = 10 << 20) -> None:
    """Log to *stream*; for journald (*journal*, default: ``$JOURNAL_STREAM`` set, i.e. stderr is the
    journal under systemd) without timestamps and with each line's priority as a ``<N>`` prefix.

    With *log_file*, log there instead (timestamped lines), rotated at *log_file_bytes* with five
    old files kept (``xapid.log.1`` is the newest); the file is made mode 0600.
    """
    global _predicate
    import os

    if journal is None:
        journal = bool(os.environ.get("JOURNAL_STREAM"))
    predicate = _predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    if log_file:
        base = textFileLogObserver(open_log_file(log_file, log_file_bytes))
    else:
        base = journal_observer(stream) if journal else textFileLogObserver(stream)
    observer = FilteringLogObserver(base, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)



_predicate: LogLevelFilterPredicate | None = None


def open_log_file(path: str, max_bytes: int) -> Any:
    """A stream onto *path* rotated by size (Twisted's LogFile, which takes text: ``path.1`` … ``path.5``,
    ``.1`` the newest).  Raises OSError when the file cannot be opened (the caller reports it in one line)."""
    import os

    from twisted.python.logfile import LogFile

    directory, name = os.path.split(path)
    return LogFile(name, directory, rotateLength=max_bytes, maxRotatedFiles=5, defaultMode=0o600)


def set_log_level(level: str) -> None:
    """Change the level of the running daemon's log (SIGHUP reload)."""
    if _predicate is not None:
        _predicate.setLogLevelForNamespace("", LogLevel.levelWithName(level))  # "": the default namespace


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
