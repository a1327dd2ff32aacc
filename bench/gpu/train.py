"""Train a randomly initialised Llama with Accelerate for a fixed number of steps and record metrics.

Everything distributed comes from the environment (no ``Accelerator`` arguments), so the same
script measures ``accelerate launch --config_file`` and optimenv's bootstrap. Each rank writes
``<out-dir>/rank<N>.json``: tokens/s, time to first step, peak GPU memory, its parameter bytes,
the losses and Accelerate's state. Nothing is downloaded; the model is built from a config.
"""

from __future__ import annotations

import time

T_SCRIPT = time.time()  # before the heavy imports: time to first step counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

# Sizes of the benchmark models (Llama architecture, vocab 32000, untied embeddings).
MODELS: dict[str, dict[str, int]] = {
    # ~271M parameters: the model of machine-notes.md.
    "llama-270m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    # ~2M parameters, for checking the script on a CPU.
    "llama-tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}
VOCAB = 32000
# Environment variables recorded per run (what Accelerate reads; the rest is launcher detail).
ENV_PREFIXES = (
    "ACCELERATE_",
    "FSDP_",
    "PARALLELISM_CONFIG_",
    "OPTIMENV_",
    "NCCL_",
    "OMP_",
    "CUDA_",
    "PYTORCH_",
)
ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-270m", choices=sorted(MODELS))
    p.add_argument("--model-dir", help="load this saved random model (needed for tensor parallelism)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--label", default="")
    p.add_argument(
        "--no-hard-exit",
        dest="hard_exit",
        action="store_false",
        help="return at the end instead of os._exit(0) (a bare Ray worker would die of it)",
    )
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must be larger than --warmup")
    return args


def llama_config(name: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=False,
        **MODELS[name],
    )


def normalise(value: Any, depth: int = 0) -> Any:
    """A JSON-able, process-independent view of a plugin field (no addresses, no object ids)."""
    import enum
    import functools

    if depth > 6:
        return _clean_repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, functools.partial):
        return {
            "partial": _callable_name(value.func),
            "keywords": {k: normalise(v, depth + 1) for k, v in sorted(value.keywords.items())},
        }
    if callable(value) and hasattr(value, "__qualname__"):
        return _callable_name(value)
    if isinstance(value, dict):
        return {str(k): normalise(v, depth + 1) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, set | frozenset):
        return sorted((normalise(v, depth + 1) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [normalise(v, depth + 1) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        fields = value.__dataclass_fields__
        return {
            "type": type(value).__name__,
            **{k: normalise(getattr(value, k, None), depth + 1) for k in sorted(fields)},
        }
    return _clean_repr(value)


def _callable_name(func: Any) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _clean_repr(value: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def accelerate_state(accelerator: Any) -> dict[str, Any]:
    """What Accelerate decided: the fields the two launch paths must agree on."""
    state = accelerator.state
    out: dict[str, Any] = {
        "distributed_type": state.distributed_type.name,
        "num_processes": state.num_processes,
        "mixed_precision": str(state.mixed_precision),
        "device_type": state.device.type,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "is_fsdp2": bool(getattr(accelerator, "is_fsdp2", False)),
    }
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None:
        # Process-independent fields only; the wrap policy is a partial over the layer class.
        out["fsdp_plugin"] = {
            k: normalise(getattr(fsdp, k, None))
            for k in sorted(fsdp.__dataclass_fields__)
            if k not in ("device_id",)
        }
    ds = getattr(state, "deepspeed_plugin", None)
    if ds is not None:
        out["deepspeed_plugin"] = {
            "zero_stage": ds.zero_stage,
            "zero3_init_flag": ds.zero3_init_flag,
            "is_zero3_init_enabled": ds.is_zero3_init_enabled(),
            "offload_param_device": ds.offload_param_device,
            "offload_optimizer_device": ds.offload_optimizer_device,
            "gradient_accumulation_steps": ds.gradient_accumulation_steps,
            "gradient_clipping": normalise(ds.gradient_clipping),
            "zero3_save_16bit_model": normalise(ds.zero3_save_16bit_model),
            "deepspeed_config": normalise(ds.deepspeed_config),
        }
    pc = getattr(state, "parallelism_config", None)
    if pc is not None:
        out["parallelism_config"] = {
            k: normalise(getattr(pc, k, None))
            for k in ("dp_replicate_size", "dp_shard_size", "tp_size", "cp_size", "sp_size")
        }
    mesh = getattr(state, "device_mesh", None)
    if mesh is not None:
        out["device_mesh"] = {
            "dim_names": list(mesh.mesh_dim_names or ()),
            "shape": list(mesh.mesh.shape),
            "mesh": mesh.mesh.tolist(),
        }
    return out


def param_bytes(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes of parameters this rank holds (its shard), by device, and of the whole model."""
    local = {"cuda": 0, "cpu": 0, "meta": 0}
    full = 0
    dtypes: set[str] = set()
    kinds: set[str] = set()
    placements: dict[str, int] = {}  # DTensor placements -> parameter count (FSDP2 / TP layout)
    for p in model.parameters():
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None:  # DeepSpeed ZeRO-3: the partition; p itself is an empty placeholder
            shard = ds_tensor
            numel_full = int(p.ds_numel)
            kinds.add("zero3_partition")
        elif hasattr(p, "to_local"):  # FSDP2 / TP: a DTensor
            shard = p.to_local()
            numel_full = p.numel()
            kinds.add("dtensor")
            key = f"{tuple(p.device_mesh.mesh_dim_names or ())}={p.placements}"
            placements[key] = placements.get(key, 0) + 1
        else:
            shard = p
            numel_full = p.numel()
            kinds.add("plain")
        local[shard.device.type] = local.get(shard.device.type, 0) + shard.numel() * shard.element_size()
        full += numel_full * shard.element_size()
        dtypes.add(str(shard.dtype))
    return {
        "local_bytes": sum(local.values()),
        "local_bytes_by_device": local,
        "full_bytes": full,
        "dtypes": sorted(dtypes),
        "kinds": sorted(kinds),
        "placements": dict(sorted(placements.items())),
    }


def tp_plan_full_bytes(model: torch.nn.Module) -> int:
    """Full bytes of the parameters the model's own tensor-parallel plan shards (names, not layout).

    The plan maps module patterns ("model.layers.*.mlp.up_proj", "lm_head") to a style; every other
    parameter (embeddings, norms) stays whole across the "tp" dimension.
    """
    import fnmatch

    plan = getattr(model, "tp_plan", None) or {}
    total = 0
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in plan):
            total += p.numel() * p.element_size()
    return total


def cuda_mem() -> dict[str, int]:
    if not torch.cuda.is_available():
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(),
        "reserved": torch.cuda.memory_reserved(),
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
    }


def gpu_snapshot() -> dict[str, Any]:
    """Which processes hold a context on which GPU, and the GPUs' clocks, power and temperature.

    Read after training, while every rank still holds its context: a rank with a context on a GPU
    other than its own (an early CUDA init before Accelerate picks the device) shows here.
    """
    import subprocess

    queries = {
        "apps": ["--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
        "gpus": [
            "--query-gpu=index,uuid,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu",
            "--format=csv,noheader,nounits",
        ],
    }
    snap: dict[str, Any] = {"pid": os.getpid()}
    for key, query in queries.items():
        try:
            res = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20)
            snap[key] = [[c.strip() for c in line.split(",")] for line in res.stdout.strip().splitlines()]
        except (OSError, subprocess.SubprocessError) as exc:
            snap[key] = f"unavailable: {exc}"
    return snap


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(args: argparse.Namespace, accelerator: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    info: dict[str, Any] = {"zero3_enabled_at_creation": bool(is_deepspeed_zero3_enabled())}
    t0 = time.time()
    if args.model_dir:
        kwargs: dict[str, Any] = {}
        mesh = accelerator.torch_device_mesh
        pc = accelerator.parallelism_config
        if pc is not None and pc.tp_enabled:
            # Accelerate's N-D recipe: transformers shards the linear layers over the "tp" dimension
            # of Accelerate's mesh, then Accelerate shards over "dp_shard". Accelerate 1.15's FSDP2 +
            # TP step imports transformers' ReplicateParallel, which only transformers 5.0.0 of the
            # 5.x line has: that release takes tp_plan/device_mesh as keywords (it picks mesh["tp"]).
            import transformers.distributed as tdist

            if "tp_plan" in getattr(tdist.DistributedConfig, "__dataclass_fields__", {}):
                dist = tdist.DistributedConfig(
                    tp_plan="auto", tp_size=pc.tp_size, fsdp_size=pc.total_size // pc.tp_size
                )
                kwargs = {"distributed_config": dist, "device_mesh": mesh}
            else:
                kwargs = {"tp_plan": "auto", "device_mesh": mesh}
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(llama_config(args.model))
    info["create_s"] = time.time() - t0
    at_creation = param_bytes(model)
    info["created_partitioned"] = "zero3_partition" in at_creation["kinds"]
    info["params_at_creation"] = at_creation
    if args.model_dir:
        info["tp_plan_full_bytes"] = tp_plan_full_bytes(model)
    info["num_params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    return model, info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_seen = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_imports = time.time()
    accelerator = Accelerator()
    rank = accelerator.process_index
    world = accelerator.num_processes
    set_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    model, creation = build_model(args, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    # Synthetic tokens, the same for every launch path: rank r reads samples r, r+world, ...
    g = torch.Generator().manual_seed(args.seed)
    samples = args.steps * args.micro_batch * world
    tokens = torch.randint(0, VOCAB, (samples, args.seq_len), generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(tokens), batch_size=args.micro_batch, shuffle=False
    )

    t_prep = time.time()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sync()
    prepare_s = time.time() - t_prep
    mem_after_prepare = cuda_mem()
    params = param_bytes(model)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    model.train()
    losses: list[float] = []
    step_end: list[float] = []
    logits_dtype = None
    it = iter(loader)
    for step in range(args.steps):
        (batch,) = next(it)
        out = model(input_ids=batch, labels=batch)
        if step == 0:
            logits_dtype = str(out.logits.dtype)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach().float().item()))
        sync()
        step_end.append(time.time())
    mem_train = cuda_mem()
    # Every rank reaches this point before any snapshot: the ranks' contexts are all alive.
    accelerator.wait_for_everyone()
    snapshot = gpu_snapshot() if torch.cuda.is_available() else {"pid": os.getpid()}
    accelerator.wait_for_everyone()

    timed = args.steps - args.warmup
    elapsed = step_end[-1] - step_end[args.warmup - 1] if args.warmup > 0 else step_end[-1] - step_end[0]
    tokens_per_step = args.micro_batch * args.seq_len * world
    launch_t0 = float(os.environ.get("BENCH_LAUNCH_T0", "nan"))
    try:
        import psutil

        proc_start = psutil.Process().create_time()
    except ImportError:  # pragma: no cover - psutil is on the GPU image
        proc_start = float("nan")
    import accelerate
    import transformers

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    except ImportError:
        versions["deepspeed"] = None
    record = {
        "label": args.label,
        "rank": rank,
        "world_size": world,
        "args": vars(args),
        "versions": versions,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "env": env_seen,
        "accelerate_state": accelerate_state(accelerator),
        "creation": creation,
        "params": params,
        "logits_dtype": logits_dtype,
        "losses": losses,
        "step_end": step_end,
        "tokens_per_step_global": tokens_per_step,
        "timed_steps": timed,
        "tokens_per_s": tokens_per_step * timed / elapsed,
        "step_time_s": elapsed / timed,
        "imports_s": t_imports - T_SCRIPT,
        "prepare_s": prepare_s,
        "first_step_from_script_s": step_end[0] - T_SCRIPT,
        "first_step_from_process_s": step_end[0] - proc_start,
        "first_step_from_launch_s": step_end[0] - launch_t0,
        "mem_after_prepare": mem_after_prepare,
        "mem_train": mem_train,
        "gpu_snapshot": snapshot,
        "cuda_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if rank == 0:
        print(
            f"[train] {args.label} world={world} tok/s={record['tokens_per_s']:.0f} "
            f"loss0={losses[0]:.4f} lossN={losses[-1]:.4f} "
            f"peak={mem_train.get('max_allocated', 0) / 2**30:.2f}GiB",
            file=sys.stderr,
            flush=True,
        )
    accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    # A clean exit: torchrun + FSDP/ZeRO-3 aborts at interpreter teardown about 1 run in 10.
    if args.hard_exit:
        os._exit(0)


if __name__ == "__main__":
    main()
