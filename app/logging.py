"""Structured logs: one JSON object per line, with the job id when there is one."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from sqlalchemy.engine import make_url

# user:password@ in any URL (a broker's or a database's in an error message): the password goes
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*:)[^@\s/]*@")


def masked_url(url: str) -> str:
    """A database or broker URL fit for a log: its password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def redact(text: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    FIELDS = ("job_id", "job_kind", "worker_id", "method", "path", "status", "duration_ms")

    def format(self, record: logging.LogRecord) -> str:
        """The entry, with passwords in URLs masked wherever they appear (messages, exceptions from drivers)."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": redact(record.getMessage())}
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("cbd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
