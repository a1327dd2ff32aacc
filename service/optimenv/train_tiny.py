"""The shipped example: a tiny randomly initialised Llama learns to count, with Accelerate.

Nothing is downloaded: the model is built from a config and the data is synthetic with structure
a model can learn. Every sample counts up from a random token (modulo the vocabulary), so the next
token is always the current one plus one; the loss falls from about ln(256) = 5.5 within a few
dozen steps, which shows that training works. Run it through the bootstrap (``optimenv run``,
``optimenv ray-launch``, ``optimenv-bootstrap -- torchrun``) or on its own. Losses are fp32 means
over all ranks; under ``optimenv run`` they go back to the driver, otherwise rank 0 prints them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_STEPS = 30
VOCAB = 256


def counting_batches(samples: int, seq_len: int, seed: int) -> Any:
    """``samples`` rows of ``seq_len`` tokens, each counting up by one from a random start."""
    import torch

    starts = torch.randint(0, VOCAB, (samples, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(seq_len)) % VOCAB


def next_token_loss(logits: Any, tokens: Any) -> Any:
    """Cross-entropy of each next token, in fp32 whatever the model computes in: a loss computed in
    bf16 under mixed precision keeps about two significant digits."""
    import torch

    predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(predicted, tokens[:, 1:].reshape(-1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
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
        vocab_size=VOCAB,
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
    tokens = counting_batches(samples, args.seq_len, seed=args.seed + 1)
    loader = torch.utils.data.DataLoader(tokens, batch_size=args.micro_batch_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    started = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= args.steps:
            break
        with accelerator.accumulate(model):
            loss = next_token_loss(model(input_ids=batch).logits, batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        elapsed = time.perf_counter() - started
        sent = report(step=step, loss=mean_loss, seconds=elapsed)
        if accelerator.is_main_process and not sent:
            print(f"step {step} loss {mean_loss:.4f} ({elapsed:.2f}s)", file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
