"""The one reading of package versions, shared by the planner and the worker bootstrap.

PEP 440 order (``packaging``): a pre-release sorts below its release (``2.5.0rc1 < 2.5.0``), a local
build suffix above it (``2.5.1+cu124 >= 2.5.1``), a nightly between (``2.8.0.dev20250401``). Only the
bootstrap's ``torch_compile: auto`` step needs it on a worker, and imports it there and then.
"""

from __future__ import annotations

import re

from packaging.version import InvalidVersion, Version

# major.minor first: "2" or "v2.6" would parse, but no torch release is written that way.
# fullmatch, so a trailing newline ("2.6.0\n", which packaging strips) is refused too.
_SHAPE = re.compile(r"\d+\.\d+[0-9A-Za-z.+!-]*")


def parse_version(text: str) -> Version | None:
    """``text`` as a version, or ``None`` when it does not read as one (major.minor[.patch][...])."""
    if not isinstance(text, str) or not _SHAPE.fullmatch(text):
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def at_least(version: str, minimum: str) -> bool | None:
    """Whether ``version`` is ``minimum`` or later; ``None`` when either does not read as a version."""
    have, need = parse_version(version), parse_version(minimum)
    if have is None or need is None:
        return None
    return have >= need
