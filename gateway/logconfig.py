"""The gateway's log lines: structlog rendering one JSON object per line (orjson bytes, written as they are).

Configured once per process, by the CLI or by each worker; knows nothing of what is logged.
"""

from __future__ import annotations

import logging

import orjson
import structlog


def configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),  # bytes, written as they are
        ],
        logger_factory=structlog.BytesLoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )
