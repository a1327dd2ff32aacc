"""A described worker: what ``optimenv.bootstrap._probe`` would find on a machine with GPUs.

The deferred steps' GPU branches cannot be taken on the CI machine (it has no GPU); a
:class:`Machine` answers the probe's questions as such a machine would, so that the decisions of
:mod:`optimenv.steps` can be checked against the planner's own rules. Versions are compared by
:mod:`optimenv.versions`, as the real probe compares them. ``tests/bootstrap/gpu_check.py`` runs the
real probe on a GPU host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from optimenv.versions import at_least


class Machine(NamedTuple):
    """``gpus`` visible GPUs of compute ``capability``, with or without bf16 and peer-to-peer, and
    ``torch`` installed."""

    gpus: int = 8
    bf16: bool = True
    capability: tuple[int, int] = (9, 0)
    p2p: bool = True
    torch: str = "2.6.0"

    def cuda_device_count(self, environ: Mapping[str, str]) -> tuple[int, str]:
        return self.gpus, f"{self.gpus} GPU(s)"

    def bf16_supported(self, environ: Mapping[str, str]) -> tuple[bool, str]:
        supported = self.gpus > 0 and self.bf16
        return supported, f"bf16 {'supported' if supported else 'not supported'}"

    def min_compute_capability(self, environ: Mapping[str, str]) -> tuple[tuple[int, int] | None, str]:
        if self.gpus == 0:
            return None, "no GPU"
        return self.capability, f"compute capability {self.capability[0]}.{self.capability[1]}"

    def p2p_supported(self, environ: Mapping[str, str]) -> tuple[bool | None, str]:
        local = environ.get("LOCAL_WORLD_SIZE", "")
        count = min(int(local), self.gpus) if local.isdigit() else self.gpus
        if count < 2:
            return None, f"{count} local GPU process(es)"
        return self.p2p, f"P2P {'between all' if self.p2p else 'not between'} {count} local GPUs"

    def torch_at_least(self, minimum: str) -> tuple[bool, str]:
        newer = bool(at_least(self.torch, minimum))
        return newer, f"torch {self.torch} {'>=' if newer else '<'} {minimum}"
