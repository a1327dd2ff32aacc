"""Hostile worker specs and DeepSpeed files (issue 20): one-line refusals, nothing half-applied.

The console-script rows check what a pod sees (exit 1, one line, the command never runs); the
``apply()`` rows check that a refusal leaves the environment exactly as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest

from optimenv.bootstrap import BootstrapError, apply
from optimenv.errors import OptimEnvError
from optimenv.limits import MAX_DEPTH, MAX_JSON_FILE_BYTES
from optimenv.spec import SpecError, content_hash, spec_text
from tests.bootstrap.support import FSDP2, PRINT_ENV, ZERO3, MakeSpec, bootstrap, clean_env


def _rehash(doc: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in doc.items() if k != "hash"}
    return {**body, "hash": content_hash(body)}


def _refused(result: subprocess.CompletedProcess[str], *says: str) -> str:
    assert result.returncode == 1, result.stderr[:2000]
    assert result.stdout == ""  # the command never ran
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[:2000]
    assert lines[0].startswith("optimenv-bootstrap: error: ") and len(lines[0]) < 600, lines[0][:700]
    for phrase in says:
        assert phrase in lines[0], lines[0]
    return lines[0]


def _write_spec(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(spec_text(_rehash(doc)), encoding="utf-8")
    return path


# ---- the files themselves ------------------------------------------------------------------------


def test_spec_nested_100000_deep(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text("[" * 100_000 + "]" * 100_000)
    _refused(bootstrap("--spec", str(spec), "--", *PRINT_ENV), f"spec: is nested deeper than {MAX_DEPTH}")


def test_deepspeed_json_nested_100000_deep(make_spec: MakeSpec) -> None:
    files = make_spec(ZERO3)
    assert files.deepspeed is not None
    files.deepspeed.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused(bootstrap("--spec", str(files.spec), "--", *PRINT_ENV), "deepspeed: is nested deeper than")


def test_spec_with_a_5000_digit_integer(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    text = spec_text({**files.doc, "warnings": ["<number>"]}).replace('"<number>"', "9" * 5000)
    files.spec.write_text(text)
    _refused(
        bootstrap("--spec", str(files.spec), "--", *PRINT_ENV),
        "spec.warnings[0]: an integer written with 5,000 characters is out of range",
    )


def test_spec_that_is_dev_zero() -> None:
    _refused(bootstrap("--spec", "/dev/zero", "--", *PRINT_ENV), "a character device, not a regular file")


def test_spec_that_is_a_fifo_without_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.json"
    os.mkfifo(fifo)
    _refused(bootstrap("--spec", str(fifo), "--", *PRINT_ENV), "a FIFO or pipe, not a regular file")


def test_spec_over_the_size_limit(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    with open(spec, "wb") as handle:
        handle.truncate(6 * 1024**3)  # sparse
    _refused(
        bootstrap("--spec", str(spec), "--", *PRINT_ENV), f"larger than the limit of {MAX_JSON_FILE_BYTES:,}"
    )


def test_spec_path_with_a_nul(make_spec: MakeSpec) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        apply("spec\0.json", environ={})


# ---- what the spec asks for ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"name": "A=B"}, "'A=B' is not an environment variable name"),
        ({"name": ""}, "'' is not an environment variable name"),
        ({"name": "1ST"}, "'1ST' is not an environment variable name"),
        ({"name": "ÄCCELERATE"}, "is not an environment variable name"),
        ({"value": "on\0off"}, "contains a NUL character"),
    ],
    ids=["equals", "empty", "digit-first", "non-ascii", "nul"],
)
def test_unwritable_variable_is_refused_before_any_write(
    make_spec: MakeSpec, tmp_path: Path, entry: dict[str, str], says: str
) -> None:
    doc = dict(make_spec(FSDP2).doc)
    doc["env"] = [*doc["env"], {**doc["env"][-1], **entry}]  # last: everything before it is valid
    spec = _write_spec(tmp_path / "bad.json", doc)
    env = {"PATH": "/bin"}
    with pytest.raises(SpecError) as refused:
        apply(spec, environ=env)
    assert says in str(refused.value) and str(refused.value).startswith(f"spec.env[{len(doc['env']) - 1}]: ")
    assert env == {"PATH": "/bin"}
    _refused(bootstrap("--spec", str(spec), "--", *PRINT_ENV), says)


def test_variable_listed_twice_is_refused(make_spec: MakeSpec, tmp_path: Path) -> None:
    doc = dict(make_spec(FSDP2).doc)
    first = doc["env"][0]
    doc["env"] = [*doc["env"], {**first, "value": "other"}]
    spec = _write_spec(tmp_path / "twice.json", doc)
    env: dict[str, str] = {}
    with pytest.raises(SpecError, match=f"{first['name']} is listed twice"):
        apply(spec, environ=env)
    assert env == {}


def test_deferred_variable_that_is_not_a_name(make_spec: MakeSpec, tmp_path: Path) -> None:
    doc = dict(make_spec(FSDP2).doc)
    doc["deferred"] = [{**doc["deferred"][0], "variable": "NCCL=1"}]
    spec = _write_spec(tmp_path / "deferred.json", doc)
    with pytest.raises(SpecError, match=r"spec.deferred\[0\].variable: 'NCCL=1' is not"):
        apply(spec, environ={})


def test_spec_mapping_with_a_huge_integer() -> None:
    with pytest.raises(SpecError, match=r"spec\.deepspeed\.x: an integer of about 5,000 digits"):
        apply({"apiVersion": "optimenv.dev/v1alpha1", "deepspeed": {"x": 10**4999}}, environ={})


def test_spec_mapping_that_is_not_json() -> None:
    doc = _rehash({"apiVersion": "optimenv.dev/v1alpha1", "kind": "WorkerSpec", "policy": "plan-wins"})
    with pytest.raises(SpecError, match="spec: not JSON data"):
        apply({**doc, "env": {1, 2}}, environ={})


# ---- all or nothing on the real process environment ------------------------------------------------

_APPLY_TO_OS_ENVIRON = """
import json, os, sys
from optimenv.bootstrap import apply
from optimenv.errors import OptimEnvError
before = dict(os.environ)
try:
    apply(sys.argv[1])
except OptimEnvError as exc:
    print(json.dumps({"error": str(exc), "changed": sorted(set(os.environ.items()) ^ set(before.items()))}))
"""


def test_refusal_after_six_valid_variables_leaves_os_environ_untouched(
    make_spec: MakeSpec, tmp_path: Path
) -> None:
    doc = dict(make_spec(FSDP2).doc)
    assert len(doc["env"]) >= 6
    doc["env"] = [*doc["env"], {**doc["env"][0], "name": "OPTIMENV_TEST_NUL", "value": "a\0b"}]
    spec = _write_spec(tmp_path / "nul.json", doc)
    done = subprocess.run(
        [sys.executable, "-c", _APPLY_TO_OS_ENVIRON, str(spec)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "contains a NUL character" in report["error"]
    assert report["changed"] == []


class _RefusingEnviron(MutableMapping[str, str]):
    """An environment that refuses one variable the way ``os.environ`` refuses a bad one."""

    def __init__(self, refuse: str) -> None:
        self.data: dict[str, str] = {"PATH": "/bin"}
        self.refuse = refuse

    def __getitem__(self, key: str) -> str:
        return self.data[key]

    def __setitem__(self, key: str, value: str) -> None:
        if key == self.refuse:
            raise OSError(22, "Invalid argument")
        self.data[key] = value

    def __delitem__(self, key: str) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_a_write_that_fails_undoes_the_writes_before_it(make_spec: MakeSpec) -> None:
    files = make_spec(FSDP2)
    last = files.doc["env"][-1]["name"]
    env = _RefusingEnviron(refuse=last)
    with pytest.raises(BootstrapError) as refused:
        apply(files.spec, environ=env)
    assert str(refused.value).startswith(f"environment: cannot set {last} (")
    assert str(refused.value).endswith("nothing was set")
    assert env.data == {"PATH": "/bin"}
    assert isinstance(refused.value, OptimEnvError)
