"""Axolotl's own example configs, planned and compared with what Axolotl 0.19.0 exported for each.

``../shared/corpus/axolotl/expected.jsonl`` was produced on 2 nodes x 8 bf16 GPUs (no fp8), seen
from rank 0, with the corpus folder as the working directory. Every difference between our plan and
that record must be explained by a rule below, and every rule must be documented under its ID in
``docs/compatibility.md``: an undocumented difference fails.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from optimenv.config import TrainingConfig, load_config
from optimenv.errors import ConfigError
from optimenv.plan import DEFAULT_DEEPSPEED_PATH, Hardware, Plan, plan
from tests.conftest import SHARED

HARDWARE = Hardware(
    nodes=2, gpus_per_node=8, bf16_supported=True, fp8_supported=False, torch_version="2.13.0"
)
CORPUS_SIZE = 65
# Collection needs the example names before fixtures exist.
_CORPUS = SHARED / "corpus" / "axolotl"
FSDP1_ONLY = {
    "FSDP_SHARDING_STRATEGY": "sharding_strategy",
    "FSDP_BACKWARD_PREFETCH": "backward_prefetch",
    "FSDP_FORWARD_PREFETCH": "forward_prefetch",
}
# Axolotl's error message -> the field our one-line error names for the same rule.
SAME_ERROR = {
    "fp8 requested, but fp8 is not supported": "fp8",
    "FSDP2 not compatible with adamw_bnb_8bit": "optimizer",
    "`cpu_ram_efficient_loading` with load_in_4bit": "fsdp_config.cpu_ram_efficient_loading",
}


@dataclass(frozen=True)
class Diff:
    """One variable where our plan and Axolotl's record disagree."""

    name: str
    ours: str | None
    theirs: str | None
    source: str | None


@dataclass(frozen=True)
class Example:
    line: dict[str, Any]
    config: TrainingConfig | None
    result: Plan | None
    error: ConfigError | None

    @property
    def fsdp_version(self) -> int | None:
        return self.result.fsdp_version if self.result is not None else None

    @property
    def dropped(self) -> set[str]:
        """``fsdp_config`` keys Axolotl's schema discarded, without their ``fsdp_`` prefix (D1)."""
        return {k.removeprefix("fsdp_") for k in self.line["fsdp_config_keys_dropped"]}


Rule = Callable[[Example, Diff], bool]


def _c1(ex: Example, d: Diff) -> bool:
    # FSDP_VERSION always exported; Axolotl leaves FSDP1 to Accelerate's default (D7).
    return d.name == "FSDP_VERSION" and (d.ours, d.theirs) == ("1", None) and ex.fsdp_version == 1


def _c2(ex: Example, d: Diff) -> bool:
    # FSDP1-only keys Axolotl drops (D1) reach Accelerate; for FSDP2 a strategy becomes reshard.
    if d.theirs is not None or d.source is None:
        return False
    key = d.source.removeprefix("fsdp_config.")
    if key not in ex.dropped:
        return False
    if ex.fsdp_version == 1:
        return FSDP1_ONLY.get(d.name) == key
    return d.name == "FSDP_RESHARD_AFTER_FORWARD" and key == "sharding_strategy"


def _c3(ex: Example, d: Diff) -> bool:
    # FSDP2 reshard_after_forward: false is exported (Axolotl drops false; Accelerate defaults true).
    return (
        d.name == "FSDP_RESHARD_AFTER_FORWARD"
        and (d.ours, d.theirs) == ("false", None)
        and d.source == "fsdp_config.reshard_after_forward"
        and ex.fsdp_version == 2
    )


def _c4(ex: Example, d: Diff) -> bool:
    # FSDP1 reshard_after_forward becomes FSDP_SHARDING_STRATEGY (D9).
    if ex.fsdp_version != 1:
        return False
    if d.name == "FSDP_RESHARD_AFTER_FORWARD":
        return d.ours is None and d.theirs == "true"
    return (
        d.name == "FSDP_SHARDING_STRATEGY"
        and d.theirs is None
        and d.source == "fsdp_config.reshard_after_forward"
    )


def _c6(ex: Example, d: Diff) -> bool:
    # Class lists are written without the spaces Accelerate would keep.
    return (
        d.name == "FSDP_TRANSFORMER_CLS_TO_WRAP"
        and d.theirs is not None
        and d.ours == ",".join(p.strip() for p in d.theirs.split(","))
    )


def _c13(ex: Example, d: Diff) -> bool:
    # GAS derived from batch_size (D3).
    return d.name == "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" and d.source == "batch_size"


def _c14(ex: Example, d: Diff) -> bool:
    # fp16: true with bf16 left unset means fp16.
    cfg = ex.config
    return (
        d.name == "ACCELERATE_MIXED_PRECISION"
        and (d.ours, d.theirs) == ("fp16", "bf16")
        and cfg is not None
        and cfg.fp16 is True
        and "bf16" not in cfg.model_fields_set
    )


def _c28(ex: Example) -> bool:
    """We refuse because the parallel sizes do not multiply to the 16 processes Accelerate will see."""
    cfg = ex.config
    if ex.error is None or cfg is None:
        return False
    sizes = {
        "tensor_parallel_size": cfg.tensor_parallel_size or 1,
        "dp_shard_size": cfg.dp_shard_size or 1,
        "dp_replicate_size": cfg.dp_replicate_size or 1,
        "context_parallel_size": cfg.context_parallel_size or 1,
    }
    if sizes["dp_shard_size"] > 1:  # only then does EP join Accelerate's ParallelismConfig (C24)
        sizes["expert_parallel_size"] = cfg.expert_parallel_size or 1
    product = 1
    for size in sizes.values():
        product *= size
    world = HARDWARE.world_size
    return product > 1 and product != world and ex.error.field in sizes


def _c29(ex: Example, d: Diff) -> bool:
    """A size Axolotl's loader infers from the process count (utils/distributed.py:320-378) is in the
    environment too, so Accelerate builds the loader's mesh; Axolotl exports only the written ones."""
    inferred = ("PARALLELISM_CONFIG_DP_SHARD_SIZE", "PARALLELISM_CONFIG_DP_REPLICATE_SIZE")
    return d.name in inferred and d.theirs is None and (d.source or "").endswith("(inferred)")


def _c30(ex: Example) -> bool:
    """We refuse expert parallelism that Axolotl's expert-parallel plugin refuses when it loads the
    model (integrations/expert_parallel/plugin.py:272-340), after prepare_optim_env has run."""
    cfg = ex.config
    return (
        ex.error is not None
        and cfg is not None
        and (cfg.expert_parallel_size or 1) > 1
        and ex.error.field == "expert_parallel_size"
    )


ENV_RULES: dict[str, Rule] = {
    "C1": _c1,
    "C2": _c2,
    "C3": _c3,
    "C4": _c4,
    "C6": _c6,
    "C13": _c13,
    "C14": _c14,
    "C29": _c29,
}
# Not per-variable: C11 (ACCELERATE_DEEPSPEED_CONFIG_FILE compared by JSON), C12 (string stage in the
# JSON), C23 (AutoTP / DeepCompile rewrites in the JSON), C18 (Axolotl error on a field we do not own),
# C28 (we refuse parallel sizes whose product is not the process count), C30 (expert parallelism).
ALL_RULES = (*ENV_RULES, "C11", "C12", "C18", "C23", "C28", "C30")


def _lines(corpus: Path) -> list[dict[str, Any]]:
    with (corpus / "expected.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def examples(corpus: Path) -> dict[str, Example]:
    out: dict[str, Example] = {}
    for line in _lines(corpus):
        config = result = error = None
        try:
            # Axolotl resolves relative DeepSpeed paths against the CWD, which was the corpus folder.
            config = load_config(corpus / line["config"], base_dirs=(corpus,))
            result = plan(config, HARDWARE)
        except ConfigError as exc:
            error = exc
        out[line["config"]] = Example(line, config, result, error)
    return out


@pytest.fixture(scope="module")
def documented(repo: Path) -> set[str]:
    text = (repo / "docs" / "compatibility.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,4} (C\d+)\b", text, flags=re.MULTILINE))


def _paths(corpus: Path) -> list[str]:
    if not (corpus / "expected.jsonl").is_file():
        # One case, so the test reports the missing material (its corpus fixture skips or fails)
        # instead of pytest's silent skip of an empty parameter set.
        return ["<corpus not found>"]
    return [line["config"] for line in _lines(corpus)]


def _expected_json(ex: Example) -> tuple[dict[str, Any] | None, set[str]]:
    """Axolotl's JSON with our documented rewrites applied, and the rules that changed it."""
    theirs = ex.line["deepspeed"]
    if theirs is None or ex.config is None:
        return theirs, set()
    out = json.loads(json.dumps(theirs))
    used: set[str] = set()
    zero = out.get("zero_optimization")
    if isinstance(zero, dict) and isinstance(zero.get("stage"), str):
        zero["stage"] = int(zero["stage"])
        used.add("C12")
    if (ex.config.tensor_parallel_size or 1) > 1:
        out.setdefault("tensor_parallel", {}).setdefault("autotp_size", ex.config.tensor_parallel_size)
        out.setdefault("zero_optimization", {}).setdefault("gather_16bit_weights_on_model_save", True)
        used.add("C23")
    if ex.config.deepcompile:
        out.setdefault("compile", {}).setdefault("deepcompile", True)
        used.add("C23")
    return out, used


def _classify(ex: Example, corpus: Path) -> tuple[set[str], list[str]]:
    """The rule IDs that explain every difference for one example, and what none explains."""
    used: set[str] = set()
    unexplained: list[str] = []
    line = ex.line
    theirs_error = line["error"]
    if theirs_error is not None:
        message = theirs_error["message"]
        if _c30(ex):
            used.add("C30")  # and Axolotl's own reason is classified below
        elif _c28(ex):
            used.add("C28")
        elif ex.error is not None:
            want = next((f for s, f in SAME_ERROR.items() if s in message), None)
            if want != ex.error.field:
                unexplained.append(f"both reject, for different reasons: ours {ex.error}; Axolotl {message}")
            return used, unexplained
        # A pydantic error on a plain field names it right after the model's name.
        match = re.match(r"\d+ validation errors? for \w+ (\w+) ", message)
        if match and match.group(1) != "Value" and match.group(1) not in TrainingConfig.model_fields:
            used.add("C18")
        else:
            unexplained.append(f"Axolotl rejects it, we plan it: {message}")
        return used, unexplained
    if ex.error is not None:
        if _c30(ex):
            return {"C30"}, []
        if _c28(ex) and line["env"].get("ACCELERATE_USE_PARALLELISM_CONFIG") == "true":
            return {"C28"}, []
        return used, [f"we reject what Axolotl accepts: {ex.error}"]
    assert ex.result is not None
    ours = ex.result.env_dict
    sources = ex.result.sources
    env = line["env"]
    for name in sorted(set(ours) | set(env)):
        if name == "ACCELERATE_DEEPSPEED_CONFIG_FILE":
            # C11: Axolotl exports the path as written; ours points at the file mounted on workers.
            assert ours.get(name) == DEFAULT_DEEPSPEED_PATH
            with (corpus / env[name]).open(encoding="utf-8") as fh:
                assert json.load(fh) == line["deepspeed"]
            used.add("C11")
            continue
        if ours.get(name) == env.get(name):
            continue
        diff = Diff(name, ours.get(name), env.get(name), sources.get(name))
        rule = next((rid for rid, applies in ENV_RULES.items() if applies(ex, diff)), None)
        if rule is None:
            unexplained.append(f"{name}: ours {diff.ours!r} (from {diff.source}), Axolotl {diff.theirs!r}")
        else:
            used.add(rule)
    want_json, rewrites = _expected_json(ex)
    used |= rewrites
    if ex.result.deepspeed != want_json:
        unexplained.append("DeepSpeed JSON differs beyond the documented rewrites")
    return used, unexplained


def test_corpus_is_complete(corpus: Path, examples: dict[str, Example]) -> None:
    assert len(examples) == CORPUS_SIZE
    for path in examples:
        assert (corpus / path).is_file(), path
    assert sum(1 for ex in examples.values() if ex.line["error"]) == 5


def test_every_rule_is_documented(documented: set[str]) -> None:
    missing = [rid for rid in ALL_RULES if rid not in documented]
    assert not missing, f"rules without a section in docs/compatibility.md: {missing}"


@pytest.mark.parametrize("path", _paths(_CORPUS))
def test_example_matches_axolotl(
    path: str, corpus: Path, examples: dict[str, Example], documented: set[str]
) -> None:
    ex = examples[path]
    used, unexplained = _classify(ex, corpus)
    assert not unexplained, f"{path}: undocumented differences: {unexplained}"
    undocumented = sorted(used - documented)
    assert not undocumented, f"{path}: rules {undocumented} are not in docs/compatibility.md"


def test_dropped_fsdp_keys_are_not_silently_dropped(examples: dict[str, Example]) -> None:
    """D1: each key Axolotl discards is exported by us or named in a warning."""
    checked = 0
    for path, ex in examples.items():
        if ex.result is None:
            continue
        for key in sorted(ex.dropped):
            exported = any(v.source == f"fsdp_config.{key}" for v in ex.result.env)
            warned = any(w.startswith(f"fsdp_config.{key}:") for w in ex.result.warnings)
            assert exported or warned, f"{path}: fsdp_config.{key} is dropped silently"
            checked += 1
    assert checked == 53  # in the 37 planned files that carry such keys (ref §7 D1)


def test_known_differences(corpus: Path, examples: dict[str, Example]) -> None:
    """Which rules the corpus exercises today; a new one needs a look (and a doc section)."""
    used: dict[str, int] = {}
    for ex in examples.values():
        for rid in _classify(ex, corpus)[0]:
            used[rid] = used.get(rid, 0) + 1
    assert set(used) == {"C1", "C2", "C11", "C18", "C29", "C30"}, used
    assert used["C18"] == 1  # the fractional warmup_steps of the expert-parallel example
    # Both ALST examples (CP 8: dp_shard_size 2 inferred) and qwen3-8b-fsdp-tp-cp (tp 2 x cp 2 x
    # dp_shard 2: dp_replicate_size 2 inferred) would multiply to less than the 16 processes.
    assert used["C29"] == 3
    # EP 2 x dp_shard 2 (qwen3-30b) and pure EP 8 (glm-5.2) on 16 processes.
    assert used["C30"] == 2
    planned_ds = [
        ex for ex in examples.values() if ex.line["deepspeed"] is not None and ex.result is not None
    ]
    assert used["C11"] == len(planned_ds) == 9  # with the DeepSpeed ALST example (C29)


def test_no_corpus_key_is_a_near_miss_or_an_accelerate_file(examples: dict[str, Example]) -> None:
    """C31: Axolotl's own keys never warn as misspellings; C32: its configs read as Axolotl's format."""
    for path, ex in examples.items():
        if ex.config is None:
            continue
        assert ex.config.near_misses == (), path
        assert ex.config.launch is None, path
