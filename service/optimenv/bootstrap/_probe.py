"""What the worker's hardware and installed packages say, asked as cheaply as each question allows.

Every probe first checks whether a GPU can be present at all (device nodes, ``CUDA_VISIBLE_DEVICES``)
so that a CPU-only worker never imports torch: the pod entrypoint runs this on every start. Where a
GPU may be present, torch answers (and Accelerate's own P2P check, when Accelerate is installed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# NVIDIA (driver control node, first GPU), AMD ROCm (torch.cuda works through HIP), WSL.
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def no_gpu_reason(environ: Mapping[str, str]) -> str | None:
    """Why this worker certainly has no usable GPU, or ``None`` if it may have one."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    if not any(os.path.exists(node) for node in _GPU_DEVICE_NODES):
        return "no GPU device node (/dev/nvidia*, /dev/kfd) on this machine"
    return None


def _cuda() -> Any | None:
    """``torch.cuda`` when torch is installed and sees a device, else ``None``."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda if torch.cuda.is_available() else None


def cuda_device_count(environ: Mapping[str, str]) -> tuple[int, str]:
    """Visible CUDA devices, and how that was found out."""
    reason = no_gpu_reason(environ)
    if reason is not None:
        return 0, reason
    cuda = _cuda()
    if cuda is None:
        return 0, "torch sees no CUDA device"
    count = int(cuda.device_count())
    return count, f"torch sees {count} CUDA device(s)"


def bf16_supported(environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the GPU supports bf16, as Axolotl asks it (``torch.cuda.is_bf16_supported()``)."""
    reason = no_gpu_reason(environ)
    if reason is not None:
        return False, reason
    cuda = _cuda()
    if cuda is None:
        return False, "torch sees no CUDA device"
    supported = bool(cuda.is_bf16_supported())
    name = cuda.get_device_name(0)
    return supported, f"{name}: bf16 {'supported' if supported else 'not supported'}"


def min_compute_capability(environ: Mapping[str, str]) -> tuple[tuple[int, int] | None, str]:
    """The lowest compute capability among the visible GPUs (``None`` without a GPU)."""
    count, how = cuda_device_count(environ)
    if count == 0:
        return None, how
    cuda = _cuda()
    assert cuda is not None
    caps = [tuple(cuda.get_device_capability(i)) for i in range(count)]
    low = min(caps)
    return (int(low[0]), int(low[1])), f"{cuda.get_device_name(0)}: compute capability {low[0]}.{low[1]}"


def p2p_supported(environ: Mapping[str, str]) -> tuple[bool | None, str]:
    """Whether the GPUs this node's processes share can talk peer to peer.

    ``None``: nothing to check (no GPU, or a single local process). Two checks, like Axolotl's:
    Accelerate's ``check_cuda_p2p_ib_support`` (``nvidia-smi``: RTX 40 cards on an old driver), then
    ``torch.cuda.can_device_access_peer`` between every pair of the node's local devices. The local
    devices are ``LOCAL_WORLD_SIZE`` of them (all visible ones before a launcher has set it), not
    Axolotl's ``NODE_WORLD_SIZE`` with a default of 8, which probes a device that is not there (D17).
    """
    count, how = cuda_device_count(environ)
    if count == 0:
        return None, how
    local = environ.get("LOCAL_WORLD_SIZE", "")
    n_local = min(int(local), count) if local.isdigit() else count
    if n_local < 2:
        return None, f"{n_local} local GPU process(es): no peer-to-peer traffic on this node"
    try:
        from accelerate.utils import check_cuda_p2p_ib_support
    except ImportError:  # pragma: no cover - accelerate is in the worker extra
        pass
    else:
        if not check_cuda_p2p_ib_support():
            return False, "Accelerate: RTX 40 GPUs with a driver older than 550.40.07"
    cuda = _cuda()
    assert cuda is not None
    for i in range(n_local):
        for j in range(n_local):
            if i != j and not cuda.can_device_access_peer(i, j):
                return False, f"torch: device {i} cannot access device {j} peer to peer"
    return True, f"P2P between all {n_local} local GPUs"


def installed_version(package: str) -> str | None:
    """An installed package's version, read from its metadata (importing torch would take seconds)."""
    import importlib.metadata  # ~10 ms of imports: only for specs that need a version

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensor_parallel_import_gap() -> str | None:
    """Why Accelerate's FSDP2 + tensor-parallel ``prepare()`` would fail on an import, or ``None``.

    Accelerate 1.15.0's ``Accelerator._prepare_tp`` imports ``ReplicateParallel`` from
    ``transformers.integrations.tensor_parallel``, which transformers dropped after 5.0.0
    (docs/gpu.md). The installed sources are read, not imported: importing both takes seconds.
    """
    import importlib.util

    dirs = []
    for name in ("accelerate", "transformers"):
        spec = importlib.util.find_spec(name)  # a top-level package: located, not executed
        if spec is None or not spec.submodule_search_locations:
            return None  # not installed: whatever fails later says so itself
        dirs.append(Path(next(iter(spec.submodule_search_locations))))
    gap = tensor_parallel_source_gap(dirs[0], dirs[1])
    if gap is None:
        return None
    accelerate, transformers = (
        f"{n} {installed_version(n) or '(version unknown)'}" for n in ("accelerate", "transformers")
    )
    return f"{accelerate} {gap}, which {transformers} does not have"


def tensor_parallel_source_gap(accelerate_dir: Path, transformers_dir: Path) -> str | None:
    """The import Accelerate's sources make that transformers' sources lack (see above), or ``None``."""
    try:
        accelerator = (accelerate_dir / "accelerator.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "import ReplicateParallel" not in accelerator:
        return None
    try:
        provider = (transformers_dir / "integrations" / "tensor_parallel.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        provider = ""
    if "ReplicateParallel" in provider:
        return None
    return "imports ReplicateParallel from transformers.integrations.tensor_parallel"


def torch_at_least(minimum: str) -> tuple[bool, str]:
    """Whether the installed torch is ``minimum`` or later (a pre-release is not), and why."""
    version = installed_version("torch")
    if version is None:
        return False, "torch is not installed"
    from optimenv.versions import at_least  # packaging: imported only for specs that ask

    newer = at_least(version, minimum)
    if newer is None:
        return False, f"torch {version} or the minimum {minimum} does not read as a version"
    return newer, f"torch {version} {'>=' if newer else '<'} {minimum}"
