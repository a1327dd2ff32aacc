"""Baseline of the Ray GPU proof: a bare Ray ``TorchTrainer``, Accelerate set up from a hand-written
``accelerate config`` file the way ``accelerate launch --config_file`` sets it up, and no optimenv.

Each Ray Train worker takes the Accelerate variables that Accelerate's own launcher derives from the
file (its argument parser, ``_validate_launch_command`` and ``prepare_multi_gpu_env`` /
``prepare_deepspeed_cmd_env``), then runs the training script as ``__main__``. Ray Train has set
the ranks and the process group by then, as it does under ``optimenv run``.

Usage (from the repository root)::

    python3 bench/gpu/ray_bare.py --workers 1 --config_file bench/gpu/configs/accelerate/fsdp2-1gpu.yaml \\
        -- bench/gpu/train.py --no-hard-exit --out-dir OUT ...
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any

ACCELERATE_PREFIXES = ("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")


def accelerate_env(launch_args: list[str]) -> dict[str, str]:
    """The Accelerate variables ``accelerate launch LAUNCH_ARGS`` gives its training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(launch_args)
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(ACCELERATE_PREFIXES)}


def _train_loop(config: dict[str, Any]) -> None:
    os.chdir(config["cwd"])  # relative paths (the DeepSpeed file) as from the driver's directory
    os.environ.update(config["env"])
    sys.argv = [config["script"], *config["args"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(config["script"])))
    runpy.run_path(config["script"], run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    """``--workers N [accelerate launch options] -- SCRIPT [ARGS...]``."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--" not in raw or raw.index("--") == len(raw) - 1:
        raise SystemExit("usage: ray_bare.py --workers N [accelerate launch options] -- SCRIPT [ARGS...]")
    split = raw.index("--")
    script, *script_args = raw[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, required=True)
    args, launch_args = parser.parse_known_args(raw[:split])
    env = accelerate_env([*launch_args, "--num_processes", str(args.workers), script])

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", include_dashboard=False)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= args.workers
    config = {"env": env, "script": script, "args": script_args, "cwd": os.getcwd()}
    TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu),
    ).fit()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
