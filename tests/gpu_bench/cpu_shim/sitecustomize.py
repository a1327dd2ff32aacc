"""Test-only: let Accelerate turn on FSDP and DeepSpeed on a CPU-only machine (gloo).

Accelerate 1.15 enables FSDP/DeepSpeed from env only on accelerator devices (accelerate-env.md
section 4). Put this folder on PYTHONPATH and set GPU_BENCH_CPU_SHIM=1 to run bench/gpu/train.py
under torchrun on CPUs; the GPU runs never see it.
"""

import os

if os.environ.get("GPU_BENCH_CPU_SHIM") == "1":
    # This shim stands for a GPU node, where the bootstrap leaves ACCELERATE_USE_CPU alone; on a
    # CPU-only node it would set it to true, and Accelerate would then ignore FSDP and DeepSpeed.
    os.environ.setdefault("ACCELERATE_USE_CPU", "false")
    import torch
    from accelerate import state as _state
    from accelerate.utils import DistributedType

    _orig_backend = _state.PartialState._prepare_backend
    _orig_init = _state.AcceleratorState.__init__

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):  # type: ignore[no-untyped-def]
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available():
            return "gloo", DistributedType.MULTI_CPU
        return _orig_backend(self, cpu, sagemaker_dp, backend)

    def _init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Ray CPU workers carry ACCELERATE_USE_CPU=true, which keeps Accelerate off DeepSpeed: hide it.
        hidden = None
        if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            hidden = os.environ.pop("ACCELERATE_USE_CPU", None)
        try:
            _orig_init(self, *args, **kwargs)
        finally:
            if hidden is not None:
                os.environ["ACCELERATE_USE_CPU"] = hidden
        # Re-created states (AcceleratorState()) copy PartialState's MULTI_CPU back: switch again.
        plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            if kwargs.get("fsdp_plugin") is not None and self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    _state.PartialState._prepare_backend = _prepare_backend
    _state.AcceleratorState.__init__ = _init

    # DeepSpeed JIT-compiles a shared-memory op for CPU collectives (g++, 20-45 s, a file lock that
    # a killed run leaves behind); gloo alone is enough for these tests. Patched when imported, so
    # processes that never use DeepSpeed (the Ray driver) do not import it.
    import importlib.abc
    import importlib.util
    import sys

    class _NoShmOp(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name != "deepspeed.comm.torch":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):  # type: ignore[no-untyped-def]
                run(module)
                module.build_shm_op = lambda: None

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _NoShmOp())

if os.environ.get("GPU_BENCH_DUMP_AFTER"):  # debugging hangs: every thread's stack, then exit
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ["GPU_BENCH_DUMP_AFTER"]), exit=True)
