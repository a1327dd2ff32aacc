"""The one exception family optimenv raises for bad input.

Every message is a single line that names the field (as a dotted path) and, where there is one,
how to fix it. The CLI prints ``str(error)`` and exits 1; nothing else is shown to the user.
"""

from __future__ import annotations


class OptimEnvError(Exception):
    """Base class: input or state that optimenv refuses, with a one-line explanation."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


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
