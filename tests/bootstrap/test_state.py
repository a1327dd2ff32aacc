"""The snapshot of Accelerate's state each Ray worker sends back, over the state objects a GPU run builds.

On GPUs, ``optimenv run`` with ZeRO-3 trained and then failed in this snapshot: Accelerate keeps a
single ``DeepSpeedPlugin`` (not a dict) in ``AcceleratorState.deepspeed_plugins``. These tests build
the real objects (Accelerate's own classes, DeepSpeed installed) in the shapes Accelerate stores them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from optimenv.bootstrap._state import accelerate_state
from optimenv.local_run import effective_setup

ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


@pytest.fixture
def state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    # As Accelerator() builds it (AcceleratorState refuses to be built directly otherwise).
    yield functools.partial(AcceleratorState, _from_accelerator=True, dynamo_plugin=TorchDynamoPlugin())
    AcceleratorState._reset_state(reset_partial_state=True)


def _deepspeed(monkeypatch: pytest.MonkeyPatch, stage: int) -> Any:
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    return DeepSpeedPlugin(hf_ds_config={**ZERO3, "zero_optimization": {"stage": stage}})


def test_nothing_to_report_before_accelerate_starts(state: Any) -> None:
    assert accelerate_state() is None


def test_one_deepspeed_plugin_as_accelerate_stores_it(state: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    created = state(deepspeed_plugin=_deepspeed(monkeypatch, 3))
    assert not isinstance(created.deepspeed_plugins, dict)  # the shape that broke the report
    snapshot = accelerate_state()
    assert snapshot is not None and "snapshot_error" not in snapshot
    assert snapshot["distributed_type"] == "DEEPSPEED"
    assert snapshot["deepspeed"]["default"]["zero_stage"] == 3
    assert snapshot["deepspeed"]["default"]["selected"] is True
    assert effective_setup(snapshot)["mode"] == "DEEPSPEED (ZeRO-3)"


def test_deepspeed_mixed_precision_is_what_its_json_enables(
    state: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On an H100, ZeRO-3 with bf16 reported "mixed precision no": AcceleratorState keeps "no" in
    # _mixed_precision and answers from the DeepSpeed JSON, which set_mixed_precision enabled.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    created = state(deepspeed_plugin=_deepspeed(monkeypatch, 3))
    # What state.py stores on an accelerator, where PartialState already says DEEPSPEED: "no".
    created._mixed_precision = "no"
    snapshot = accelerate_state()
    assert snapshot is not None
    assert snapshot["mixed_precision"] == created.mixed_precision == "bf16"
    assert effective_setup(snapshot)["mixed_precision"] == "bf16"


def test_several_named_deepspeed_plugins(state: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = {"student": _deepspeed(monkeypatch, 2), "teacher": _deepspeed(monkeypatch, 3)}
    state(deepspeed_plugin=plugins)
    snapshot = accelerate_state()
    assert snapshot is not None
    named = snapshot["deepspeed"]
    assert list(named) == ["student", "teacher"]
    assert (named["student"]["zero_stage"], named["teacher"]["zero_stage"]) == (2, 3)
    # The first plugin is the active one (Accelerate selects it); the report shows its stage.
    assert named["student"]["selected"] and not named["teacher"]["selected"]
    assert effective_setup(snapshot)["mode"] == "DEEPSPEED (ZeRO-2)"


def test_an_fsdp2_plugin(state: Any) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False)
    created = state()
    # What Accelerate's FSDP branch assigns on an accelerator (state.py); on CPU it never runs.
    created.distributed_type = DistributedType.FSDP
    created.fsdp_plugin = plugin
    snapshot = accelerate_state()
    assert snapshot is not None and "snapshot_error" not in snapshot
    assert (snapshot["distributed_type"], snapshot["fsdp_version"]) == ("FSDP", 2)
    assert snapshot["fsdp"]["reshard_after_forward"] is False
    assert effective_setup(snapshot)["mode"] == "FSDP2"


def test_a_parallelism_config(state: Any) -> None:
    from accelerate.parallelism_config import ParallelismConfig

    state(parallelism_config=ParallelismConfig(dp_shard_size=2, tp_size=2))
    snapshot = accelerate_state()
    assert snapshot is not None
    assert snapshot["parallelism"] == {"dp_replicate_size": 1, "dp_shard_size": 2, "tp_size": 2, "cp_size": 1}


def test_an_unreadable_field_is_reported_not_raised(state: Any) -> None:
    class Broken:
        @property
        def fsdp_version(self) -> int:
            raise RuntimeError("not set up")

    created = state()
    created.fsdp_plugin = Broken()
    snapshot = accelerate_state()
    assert snapshot is not None
    assert snapshot["snapshot_error"] == "RuntimeError: not set up"
    assert snapshot["distributed_type"] in ("NO", "MULTI_CPU")
