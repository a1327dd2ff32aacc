"""Every bound optimenv puts on its input, and the bounded reading every entry point shares.

The CLI, the Python API, the controller and the worker bootstrap read files with
:func:`read_file`, parse JSON with :func:`load_json` and check parsed data with :func:`check_data`;
the YAML loader in :mod:`optimenv.config` applies the same bounds while it composes the document,
so an alias that would repeat megabytes is refused before anything repeats it. Each bound is
checked before the work it protects, and ``docs/limits.md`` lists them. Standard library only:
the bootstrap imports this on every pod start.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import IO, Any

from optimenv.errors import SHOWN_MAX, ConfigError, int_size, shown

#: A training config: a file, standard input or a ConfigMap key.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: A DeepSpeed JSON or worker spec file: what one ConfigMap can carry to the workers.
MAX_JSON_FILE_BYTES = 1024 * 1024
#: Values (scalars, mappings, sequences, keys) of a parsed document, every alias counted as what it repeats.
MAX_VALUES = 100_000
#: Bytes of text (UTF-8) of a parsed document, every alias counted as what it repeats.
MAX_TEXT_BYTES = 8 * 1024 * 1024
#: Nesting of mappings and sequences; the deepest real config has about five levels.
MAX_DEPTH = 64
#: Integers must fit a signed 64-bit integer (what Kubernetes, JSON consumers and torch can hold).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: An integer written with more characters than this is refused without converting it (a 64-bit
#: integer in binary, the longest YAML spelling, needs 67).
MAX_INT_CHARS = 100

_RANGE_HINT = "integers must lie between -2^63 and 2^63-1"


class OversizedInt:
    """Stands for an integer literal too long to convert; :func:`check_data` refuses it by path."""

    __slots__ = ("chars",)

    def __init__(self, chars: int) -> None:
        self.chars = chars


def read_file(path: str, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Raises :class:`OSError` (``strerror`` says why) for anything else: a FIFO is refused without
    waiting for a writer, a device or ``/proc`` file without reading more than ``limit + 1`` bytes.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{_file_kind(mode)}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1024 * 1024))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise OSError(errno.EFBIG, f"larger than the limit of {limit:,} bytes")
    finally:
        os.close(fd)


def read_stream(stream: IO[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes of ``stream`` (standard input); :class:`OSError` when there are more."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than the limit of {limit:,} bytes")
    return data


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO or pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def load_json(text: str, root: str) -> Any:
    """``json.loads`` within the bounds; ``root`` names the document in errors.

    Raises :class:`ValueError` for text that is not JSON (NaN and Infinity included) and
    :class:`~optimenv.errors.ConfigError`, naming the field, for JSON beyond a bound.
    """
    try:
        value = json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
    except RecursionError:
        raise ConfigError(root, f"is nested deeper than {MAX_DEPTH} levels", "flatten it") from None
    check_data(value, root)
    return value


def _json_int(text: str) -> int | OversizedInt:
    return OversizedInt(len(text)) if len(text) > MAX_INT_CHARS else int(text)


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def text_bytes(value: str) -> int:
    """UTF-8 size of ``value`` without encoding ASCII text."""
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def describe_int(value: int | OversizedInt) -> str:
    """An integer for a message: itself, or its size when it is too long to show."""
    if isinstance(value, OversizedInt):
        return f"an integer written with {value.chars:,} characters"
    return int_size(value) if value.bit_length() > 256 else shown(value)


def int_refusal(field: str, value: int | OversizedInt) -> ConfigError:
    return ConfigError(field, f"{describe_int(value)} is out of range", _RANGE_HINT)


def too_many_values(root: str, alias: str | None = None) -> ConfigError:
    """``alias``: the YAML alias that crossed the bound (``"the alias *a at line 3 repeats …"``)."""
    if alias:
        return ConfigError(root, f"expands to more than {MAX_VALUES:,} values", alias + _ALIAS_HINT)
    return ConfigError(
        root,
        f"has more than {MAX_VALUES:,} values",
        "a training config needs far fewer: keep data sets and bulk data out of it",
    )


def too_much_text(root: str, alias: str | None = None) -> ConfigError:
    if alias:
        return ConfigError(
            root, f"expands to more than {MAX_TEXT_BYTES:,} bytes of text", alias + _ALIAS_HINT
        )
    return ConfigError(
        root,
        f"holds more than {MAX_TEXT_BYTES:,} bytes of text",
        "keep data sets and bulk data out of the config",
    )


_ALIAS_HINT = "; YAML aliases that repeat large sections are not supported: write the values out"


def too_deep(field: str) -> ConfigError:
    return ConfigError(field, f"is nested deeper than {MAX_DEPTH} levels", "flatten it")


def check_data(value: Any, root: str = "") -> None:
    """Refuse parsed data beyond the bounds: values, text, depth, integer range.

    Errors name the field as ``root.key[3].other`` (a config's fields have no ``root``: ``""``).
    A walk that stops at the first bound it crosses, so its cost is bounded too; an object reached
    twice (a YAML alias, a shared reference) counts twice, as every later walk would visit it twice.
    """
    values = text = 0
    # (item, depth, where): ``where`` is (parent's where, key), a path built only for a message.
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]
    while stack:
        item, depth, where = stack.pop()
        values += 1
        if values > MAX_VALUES:
            raise too_many_values(root or "config")
        if isinstance(item, str):
            text += text_bytes(item)
        elif isinstance(item, bytes | bytearray):
            text += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                raise int_refusal(path_of(root, where), item)
        elif isinstance(item, OversizedInt):
            raise int_refusal(path_of(root, where), item)
        elif isinstance(item, dict | list | tuple | set | frozenset):
            if depth > MAX_DEPTH:
                raise too_deep(path_of(root, where))
            if isinstance(item, dict):
                for key, sub in item.items():
                    stack.append((key, depth + 1, where))
                    stack.append((sub, depth + 1, (where, key)))
            else:
                stack.extend((sub, depth + 1, (where, i)) for i, sub in enumerate(item))
        if text > MAX_TEXT_BYTES:
            raise too_much_text(root or "config")


def path_of(root: str, where: Any) -> str:
    """``root.key[3].other`` from the linked ``(parent, key)`` pairs of :func:`check_data`."""
    keys: list[Any] = []
    while where is not None:
        where, key = where
        keys.append(key)
    out = root
    for key in reversed(keys):
        if isinstance(key, int) and not isinstance(key, bool):
            out += f"[{key}]"
        else:
            out += f".{key_text(key)}" if out else key_text(key)
    return out or "config"


def key_text(key: Any, limit: int = SHOWN_MAX) -> str:
    """A key (or a path) for a message: itself when short and printable, else clipped and quoted."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= limit:
        return key
    return shown(key, limit)


def json_problem(exc: ValueError) -> str:
    """Where and why :func:`load_json` found no JSON, for a message."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno} column {exc.colno}: {exc.msg}"
    return str(exc)
