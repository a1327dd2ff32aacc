"""The shipped example: a tiny randomly initialised Llama trained with Accelerate on synthetic tokens.

Nothing is downloaded: the model is built from a config and the data is random token ids. Run it
through the bootstrap (``optimenv run``, ``optimenv ray-launch``, ``optimenv-bootstrap -- torchrun``)
or on its own. Each step's loss goes to stderr and, under ``optimenv run``, back to the driver.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimenv.bootstrap.ray import report

    accelerator = Accelerator()
    set_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    samples = args.steps * args.micro_batch_size * accelerator.num_processes
    tokens = torch.randint(
        0, config.vocab_size, (samples, args.seq_len), generator=torch.Generator().manual_seed(1)
    )
    loader = torch.utils.data.DataLoader(tokens, batch_size=args.micro_batch_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    started = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= args.steps:
            break
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        elapsed = time.perf_counter() - started
        if accelerator.is_main_process:
            print(f"step {step} loss {mean_loss:.4f} ({elapsed:.2f}s)", file=sys.stderr, flush=True)
        report(step=step, loss=mean_loss, seconds=elapsed)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
