"""Structured logging for the daemon and its workers: one event per line.

JSON lines when stdout is not a terminal (systemd's journal, files, pipes),
coloured console lines on a terminal. Per-request context (operation id,
method, caller, container) is bound with contextvars so every event emitted
while serving a call carries it. An engine worker logs to its stderr (the
daemon's log) in the daemon's format: ``child_env()`` passes level and format
on, ``configure_from_env()`` takes them. (The call's context travels in the
worker's request, as a worker may be started before the call.)
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

FORMATS = ("auto", "json", "console")
LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


LEVEL_ENV, FORMAT_ENV = "CKPTD_LOG_LEVEL", "CKPTD_LOG_FORMAT"
_current = {"level": "info", "format": "auto"}


def configure_daemon(level: str, fmt: str) -> None:
    """The daemon's logging; remembered so that workers log the same way."""
    stream = sys.stdout
    resolved = fmt if fmt != "auto" else ("console" if stream.isatty() else "json")
    _current.update(level=level, format=resolved)
    configure(level, resolved, stream)


def child_env() -> dict[str, str]:
    """Environment for a worker: our level and format."""
    return {LEVEL_ENV: _current["level"], FORMAT_ENV: _current["format"]}


def configure_from_env() -> None:
    """A worker's logging, on stderr, as its daemon asked."""
    level = os.environ.get(LEVEL_ENV, "info")
    fmt = os.environ.get(FORMAT_ENV, "auto")
    configure(level if level in LEVELS else "info", fmt if fmt in FORMATS else "auto", sys.stderr)
