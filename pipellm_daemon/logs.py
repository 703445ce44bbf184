"""structlog JSON lines on stderr; the level can change at run time (SIGHUP re-reads it)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_current = {"level": logging.INFO}


def _filter_level(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _LEVELS.get(method if method != "warn" else "warning", logging.INFO) < _current["level"]:
        raise structlog.DropEvent
    return event


def configure(level: str = "info", stream: Any = None) -> None:
    _current["level"] = _LEVELS[level]
    structlog.configure(
        processors=[
            _filter_level,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    _current["level"] = _LEVELS[level]


def get(name: str = "pipellmd") -> Any:
    return structlog.get_logger(name)
