"""Parallel sizes: the ones Axolotl's model loader infers, and the ones Accelerate refuses.

Standard library only: the planner settles the sizes when it knows the process count, and the
worker bootstrap (the ``parallel_sizes`` deferred step, :class:`optimenv.steps.ParallelSizes`) when
only the worker knows it. Both call :func:`settle` with the same inputs, so both decide alike.

Axolotl's loader (``src/axolotl/utils/distributed.py:320-378`` at 067b021c) fills the sizes a config
leaves out from the world size, but only into the device mesh it loads the model with; the
environment keeps the written sizes, and Accelerate then checks those against the process count.
Writing the inferred sizes into the environment makes Accelerate build the loader's mesh (C29).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from optimenv.errors import ConfigError

#: axis -> the ``PARALLELISM_CONFIG_<X>_SIZE`` variable Accelerate (or Axolotl's patch, for EP) reads.
VARIABLES = {
    "tp": "PARALLELISM_CONFIG_TP_SIZE",
    "dp_shard": "PARALLELISM_CONFIG_DP_SHARD_SIZE",
    "dp_replicate": "PARALLELISM_CONFIG_DP_REPLICATE_SIZE",
    "cp": "PARALLELISM_CONFIG_CP_SIZE",
    "ep": "PARALLELISM_CONFIG_EP_SIZE",
}
#: axis -> the Axolotl config field that writes it.
AXOLOTL_FIELDS = {
    "tp": "tensor_parallel_size",
    "dp_shard": "dp_shard_size",
    "dp_replicate": "dp_replicate_size",
    "cp": "context_parallel_size",
    "ep": "expert_parallel_size",
}


class ProcessCountError(ConfigError):
    """The parallel sizes multiply to ``product`` processes, the job has ``world`` (C28)."""

    def __init__(self, field: str, message: str, hint: str, *, product: int, world: int) -> None:
        super().__init__(field, message, hint)
        self.product = product
        self.world = world


class Sizes(NamedTuple):
    """The sizes as the config wrote them; ``None``: not written (Axolotl's loader may fill it)."""

    tp: int = 1
    cp: int = 1
    dp_shard: int | None = None
    dp_replicate: int | None = None
    ep: int = 1

    def value(self, axis: str) -> int:
        return int(getattr(self, axis) or 1)


class Layout(NamedTuple):
    """What besides the sizes decides them.

    ``fsdp``: Axolotl's ``cfg.fsdp or cfg.fsdp_config``. ``fsdp_version``: ``None`` without FSDP.
    ``infer``: Axolotl's loader builds its mesh for this config (FSDP2, or TP/CP without FSDP1).
    ``axolotl``: Axolotl trains it, so its patch of Accelerate's checks applies (EP counts, context
    parallelism may stand alone); ``False`` for an ``accelerate config`` file. ``always_built``:
    Accelerate builds a ``ParallelismConfig`` even when every size is 1 (an ``accelerate config``
    file with a ``parallelism_config`` section). ``names``: axis -> the field as the user wrote it.
    """

    fsdp: bool
    fsdp_version: int | None
    deepspeed: bool
    infer: bool
    axolotl: bool = True
    always_built: bool = False
    names: Mapping[str, str] = AXOLOTL_FIELDS

    def builds_config(self, written: Sizes) -> bool:
        """Whether Accelerate builds a ``ParallelismConfig`` (``ACCELERATE_USE_PARALLELISM_CONFIG``)."""
        return self.always_built or any(
            written.value(a) > 1 for a in ("tp", "dp_shard", "dp_replicate", "cp")
        )


class Settled(NamedTuple):
    """The sizes Accelerate will see, the ones inferred (axis -> size) and what to tell the user."""

    sizes: dict[str, int]
    inferred: dict[str, int]
    notes: tuple[str, ...]


def settle(written: Sizes, world: int, layout: Layout, what: str) -> Settled:
    """Infer the missing sizes for ``world`` processes (``what`` names them) and check the result.

    Raises :class:`~optimenv.errors.ConfigError` for what Accelerate (or Axolotl's expert-parallel
    plugin) would refuse with these sizes.
    """
    check_static(written, layout)
    check_expert_parallel(written, world, layout, what)
    sizes = {axis: written.value(axis) for axis in ("tp", "dp_shard", "dp_replicate", "cp")}
    if not layout.builds_config(written):
        return Settled(sizes, {}, ())
    _check_divides(written, world, layout, what)
    inferred = _infer(written, world, layout) if layout.infer and world > 1 else {}
    sizes.update(inferred)
    _check_sizes(written, sizes, world, layout, what)
    notes = tuple(
        f"{layout.names[axis]}: {'not set' if getattr(written, axis) is None else getattr(written, axis)}; "
        f"{size} inferred from the {world} processes, as Axolotl's model loader does"
        for axis, size in inferred.items()
    )
    return Settled(sizes, inferred, notes)


def check_static(written: Sizes, layout: Layout) -> None:
    """What Accelerate refuses whatever the process count (``parallelism_config.py:355-409``)."""
    product = math.prod(written.value(a) for a in ("tp", "dp_shard", "dp_replicate", "cp"))
    cp = written.cp
    if layout.fsdp_version == 1 and product > 1:
        # Axolotl's patch lets context parallelism stand alone (without dp_shard) on any FSDP.
        standalone = layout.axolotl and cp > 1 and written.value("dp_shard") <= 1
        if not standalone:
            raise ConfigError(
                layout.names["tp" if written.tp > 1 else "cp" if cp > 1 else "dp_shard"],
                "Accelerate builds a ParallelismConfig only with FSDP2, DeepSpeed or plain DDP, not FSDP1",
                "set fsdp_version: 2",
            )
    if cp > 1 and layout.fsdp_version is None and not layout.deepspeed and not layout.axolotl:
        raise ConfigError(
            layout.names["cp"],
            "context parallelism needs FSDP2 or DeepSpeed in Accelerate (state.py refuses it for DDP)",
            "use distributed_type FSDP with fsdp_version 2",
        )


def check_expert_parallel(written: Sizes, world: int, layout: Layout, what: str) -> None:
    """Axolotl's expert-parallel plugin (``integrations/expert_parallel/plugin.py:272-340``)."""
    ep = written.ep
    if ep <= 1 or world <= 1:
        return
    field = layout.names["ep"]
    shard, tp, cp = written.value("dp_shard"), written.tp, written.cp
    product = ep * shard * tp * cp
    if product != world:
        raise ProcessCountError(
            field,
            f"Axolotl's expert-parallel plugin needs expert_parallel_size x dp_shard_size x "
            f"tensor_parallel_size x context_parallel_size to equal the {world} processes ({what}), "
            f"not {product}",
            f"make the product {world}: pure expert parallelism takes all the processes, or dp_shard_size "
            "and context_parallel_size take the rest",
            product=product,
            world=world,
        )
    if ep < world and shard <= 1 and cp <= 1:
        raise ConfigError(
            field,
            f"{ep} on {world} processes leaves ranks that neither dp_shard_size nor "
            "context_parallel_size fill, which Axolotl's expert-parallel plugin refuses",
            "pure expert parallelism takes all the processes; otherwise shard the rest with dp_shard_size",
        )
    if tp > 1:
        raise ConfigError(
            field,
            "expert parallelism with tensor parallelism is not supported by Axolotl's expert-parallel plugin",
            "set tensor_parallel_size: 1",
        )


def _check_divides(written: Sizes, world: int, layout: Layout, what: str) -> None:
    """Sizes written whose product does not divide the process count: no inferred size can fit."""
    fixed = math.prod(written.value(a) for a in ("tp", "dp_shard", "dp_replicate", "cp"))
    if layout.axolotl and written.value("dp_shard") > 1:
        fixed *= written.ep
    if fixed < world and world % fixed:
        raise ProcessCountError(
            _first_written(written, layout.names),
            f"the parallelism sizes multiply to {fixed}, which does not divide the {world} processes "
            f"({what})",
            hint(written, world, layout, fixed),
            product=fixed,
            world=world,
        )


def _infer(written: Sizes, world: int, layout: Layout) -> dict[str, int]:
    """Axolotl's ``_get_parallel_config_kwargs`` (``distributed.py:320-378``): the sizes it adds.

    Only sizes the environment does not already carry are returned: a written size > 1 stands.
    """
    rest = world // written.ep // written.tp // written.cp
    shard, replicate = written.dp_shard, written.dp_replicate
    added: dict[str, int] = {}
    if shard is None and (replicate or 1) == 1 and rest > 1:
        added["dp_shard"], rest = rest, 1
    rest //= replicate or 1
    if rest > 1 and (shard or 1) > 1:
        rest //= shard or 1
        if rest > 1 and (replicate or 1) == 1:
            added["dp_replicate"], rest = rest, 1
    if rest > 1 and layout.fsdp and "dp_shard" not in added and (shard or 1) == 1:
        # FSDP shards whatever is left, over a written dp_shard_size of 1 too.
        added["dp_shard"], rest = rest, 1
    return added


def _check_sizes(written: Sizes, sizes: dict[str, int], world: int, layout: Layout, what: str) -> None:
    """``ParallelismConfig.__post_init__`` and ``_validate_accelerator`` with the settled sizes."""
    names = layout.names
    tp, cp, shard, replicate = sizes["tp"], sizes["cp"], sizes["dp_shard"], sizes["dp_replicate"]
    if (tp > 1 or cp > 1) and replicate > 1 and shard == 1:
        raise ConfigError(
            names["dp_replicate"],
            "Accelerate refuses tensor or context parallelism with pure data replication "
            f"(dp_replicate_size {replicate} with dp_shard_size 1)",
            "shard as well (dp_shard_size > 1, HSDP), or replicate less",
        )
    product = math.prod(sizes.values())
    counted = product * (written.ep if layout.axolotl and shard > 1 else 1)
    if counted == 1:
        return  # nothing to check: DDP replicates over every process, FSDP and DeepSpeed ignore it
    if counted != world:
        raise ProcessCountError(
            _first_written(written, names),
            f"the parallelism sizes multiply to {counted}, but Accelerate needs them to equal the {world} "
            f"processes ({what})",
            hint(written, world, layout, counted),
            product=counted,
            world=world,
        )
    if layout.fsdp_version == 2 and shard == 1 and cp == 1:
        raise ConfigError(
            names["tp" if tp > 1 else "dp_replicate"],
            "FSDP2 has no dimension to shard across (dp_shard_size and context_parallel_size are 1), "
            "which Accelerate refuses",
            "leave some of the processes to dp_shard_size",
        )


def _first_written(written: Sizes, names: Mapping[str, str]) -> str:
    return next(
        (names[a] for a in ("tp", "dp_shard", "dp_replicate", "cp", "ep") if written.value(a) > 1),
        names["dp_shard"],
    )


def hint(written: Sizes, world: int, layout: Layout, product: int) -> str:
    """A size to set that makes the product ``world``; never one the user wrote (those stand)."""
    for axis in ("dp_shard", "dp_replicate"):
        if getattr(written, axis) is None:
            rest = product
            if world % rest == 0 and world // rest > 1:
                return (
                    f"set {layout.names[axis]} to {world // rest} so the sizes multiply to the {world} "
                    "processes"
                )
    shown = " x ".join(
        f"{layout.names[a]} {written.value(a)}"
        for a in ("tp", "dp_shard", "dp_replicate", "cp", "ep")
        if written.value(a) > 1
    )
    return f"change the sizes you wrote ({shown}) or the process count so that they agree"

