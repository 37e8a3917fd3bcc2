"""Server-Sent Events: the `Event` the client yields and the decoder that builds events from stream lines.

The decoder follows the parsing rules of the HTML standard's `text/event-stream` (fields `id`, `event`, `data`,
`retry`; lines starting with `:` are comments, such as the service's keep-alive pings; an event is dispatched at
a blank line, and only if it has data). Its data is JSON. A job's event ids are integers; a study's are dotted
cursors (one position per trial, e.g. `3.1.0.0`), kept as the string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "EventDecoder", "parse_events"]


@dataclass(frozen=True)
class Event:
    """One event of a job's stream.

    Attributes:
        id: its position in the job's event log (an int; a study's stream: a dotted cursor, a str); resume after it
            with `Last-Event-ID`. None if it had none.
        type: `status`, `step`, `epoch`, `layers` or `log` for a job; `study` or `trial` for a study (the `event:`
            field; `message` when absent).
        data: the decoded JSON data (the raw text when it is not JSON).
    """

    id: int | str | None
    type: str
    data: Any


class EventDecoder:
    """Feeds on the lines of an event stream, one at a time, and returns each event when it is complete."""

    def __init__(self) -> None:
        self._id: int | str | None = None
        self._type = ""
        self._data: list[str] = []
        #: The reconnection delay the server asked for (`retry:` field), in milliseconds, if any.
        self.retry_ms: int | None = None

    def feed(self, line: str) -> Event | None:
        """Take one line (without its line ending); return the event it completes, if any."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._type = value
        elif field == "id" and "\0" not in value:
            self._id = int(value) if value.isdigit() else value if _is_cursor(value) else None
        elif field == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        event_id, kind, data = self._id, self._type or "message", self._data
        self._id, self._type, self._data = None, "", []
        if not data:
            return None
        text = "\n".join(data)
        try:
            payload: Any = json.loads(text)
        except ValueError:
            payload = text
        return Event(event_id, kind, payload)


def _is_cursor(value: str) -> bool:
    """A study stream's id: integers joined by dots."""
    parts = value.split(".")
    return len(parts) > 1 and all(part.isdigit() for part in parts)


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    """The events of a whole stream given as lines (a stream that ends mid-event drops that event)."""
    decoder = EventDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event
