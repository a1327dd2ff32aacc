"""The one exception family optimenv raises for bad input.

Every message is a single line that names the field (as a dotted path) and, where there is one,
how to fix it. The CLI prints ``str(error)`` and exits 1; nothing else is shown to the user.
"""

from __future__ import annotations

from typing import Any

#: Longest echoed value (:func:`shown`) and longest message; a longer one keeps its start and end.
SHOWN_MAX = 60
MESSAGE_MAX = 2000


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """``repr(value)`` for a message, clipped to ``limit`` characters.

    Safe for any value: a huge integer (whose ``repr`` raises past 4300 digits) is described by size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<{int_size(value)}>"
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]  # repr of the head only: never copy a megabyte to show 60 characters
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails is still named by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_size(value: int) -> str:
    """``an integer of about 5,000 digits``, without converting it to text."""
    return f"an integer of about {value.bit_length() * 30103 // 100000 + 1:,} digits"


class OptimEnvError(Exception):
    """Base class: input or state that optimenv refuses, with a one-line explanation."""

    def __init__(self, message: str) -> None:
        line = " ".join(message.split())
        if len(line) > MESSAGE_MAX:
            half = MESSAGE_MAX // 2
            line = f"{line[:half]} [...] {line[-half + 10 :]}"
        super().__init__(line)


class ConfigError(OptimEnvError):
    """A training config (or an option derived from it) that cannot be planned."""

    def __init__(self, field: str, message: str, hint: str | None = None) -> None:
        self.field = field
        self.reason = message
        self.hint = hint
        text = f"{field}: {message}" if field else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)
