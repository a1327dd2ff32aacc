"""pydantic's validation errors as the one line a user reads, for every model optimenv validates.

The training config, an ``accelerate config`` file, the job and topology (Python API and CLI) and
the ``OptimEnv`` resource's spec all end here: every field pydantic refused is named (as a dotted
path, list items as ``[i]``, union branches and validator names left out), up to
:data:`MAX_ERRORS_SHOWN` of them, each with what it must be and, clipped, what it got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from optimenv.errors import ConfigError, shown
from optimenv.limits import key_text

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

Model = TypeVar("Model", bound=BaseModel)
#: What to suggest for an unknown field: a fixed hint, or one made from the field's name.
UnknownHint = str | Callable[[str], str | None] | None

#: At most this many refused fields are spelled out; the rest are counted.
MAX_ERRORS_SHOWN = 10
# Parts of an error location that pydantic adds for itself: union branches, validators, dict keys.
_INTERNAL = (
    "function-",
    "literal[",
    "json-or-python",
    "nullable[",
    "[key]",
    "dict[",
    "list[",
    "union[",
)
_BRANCHES = frozenset({"bool", "int", "str", "float", "none"})
# What a union branch accepts, by the type of its error.
_EXPECTED = {
    "bool_parsing": "true/false",
    "bool_type": "true/false",
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "string_type": "a string",
    "dict_type": "a mapping",
    "list_type": "a list",
    "float_parsing": "a number",
    "float_type": "a number",
}


def config_error(
    exc: ValidationError, prefix: str = "", *, unknown_hint: UnknownHint = None, root: str | None = None
) -> ConfigError:
    """Every field pydantic refused, on one line: ``field: why; other.field: why; ... and N more``.

    ``prefix``: where the validated mapping sits in the user's document (``spec``), put in front of
    each field. ``unknown_hint``: what to suggest for an unknown field. ``root``: the field named
    for an error of the whole mapping (default ``prefix``).
    """
    by_field: dict[str, list[ErrorDetails]] = {}
    for error in exc.errors(include_url=False):
        field = _field(error["loc"], prefix) or (root if root is not None else prefix)
        by_field.setdefault(field, []).append(error)
    problems = [(field, _problem(errors, unknown_hint)) for field, errors in by_field.items()]
    (field, (message, hint)), rest = problems[0], problems[1:]
    parts = [message]
    parts += [f"{f}: {m}" + (f" ({h})" if h else "") for f, (m, h) in rest[: MAX_ERRORS_SHOWN - 1]]
    if len(rest) >= MAX_ERRORS_SHOWN:
        parts.append(f"... and {len(rest) - MAX_ERRORS_SHOWN + 1} more")
    return ConfigError(field, "; ".join(parts), hint if not rest else None)


def parse_model(
    model: type[Model], data: Any, prefix: str = "", unknown_hint: UnknownHint = None
) -> Model:
    """``model.model_validate(data)``, a refusal as one :class:`ConfigError` line (:func:`config_error`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, prefix, unknown_hint=unknown_hint) from None


def _field(loc: Sequence[int | str], prefix: str) -> str:
    """The dotted path of an error location, without the parts pydantic adds for itself."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith(_INTERNAL) and part not in _BRANCHES:
            path += f".{key_text(part)}" if path else key_text(part)
    return path


def _problem(errors: list[ErrorDetails], unknown_hint: UnknownHint) -> tuple[str, str | None]:
    """What is wrong with one field (and a hint), from its pydantic errors."""
    first = errors[0]
    if first["type"] == "extra_forbidden":
        name = str(first["loc"][-1]) if first["loc"] else ""
        return "unknown field", unknown_hint(name) if callable(unknown_hint) else unknown_hint
    if len(errors) > 1:
        # A union such as bf16: "auto" | bool failed on every branch: say what each accepts.
        allowed = " or ".join(dict.fromkeys(_expected(e) for e in errors))
        return f"must be {allowed} (got {shown(first.get('input'))})", None
    message = str(first["msg"]).removeprefix("Value error, ")
    if "input" in first and first["type"] not in ("value_error", "assertion_error", "missing"):
        message = f"{message} (got {shown(first['input'])})"
    return message, None


def _expected(error: ErrorDetails) -> str:
    if error["type"] == "literal_error":
        return str((error.get("ctx") or {}).get("expected", "a listed value"))
    return _EXPECTED.get(error["type"], str(error["msg"]))
