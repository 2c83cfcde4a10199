"""Log formats: plain text lines, or one JSON object per line for log collectors."""

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message and any error."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii keeps every line printable, whatever a key contains.
        return json.dumps(entry, ensure_ascii=True)
