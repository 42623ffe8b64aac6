"""Batched VAE bank against fitting the same per-class VAEs one by one.

Same hyper-parameters, same data, same number of epochs, in one run. Prints both times,
the speed-up, and each class's final fit loss under both, to show the bank learns the same
thing. Default: 100 classes x 500 samples, d = 512 (the issue's setting), a few epochs
(the ratio does not depend on the epoch count; the full 500 epochs take hours on a CPU).

    python -m benchmarks.vae_bank [--classes 100] [--samples 500] [--dim 512] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.reference_vae import fit_reference_vae
from pipeline.config import VaeGenerator
from pipeline.generators import fit_vae_bank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--latent", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loop-classes", type=int, default=None,
                        help="fit only this many classes in the loop and scale its time up (default: all)")
    args = parser.parse_args()
    settings = VaeGenerator(name="vae", hidden=args.hidden, latent=args.latent, epochs=args.epochs,
                            batch_size=64, lr=2e-4, samples_per_class=1024)
    torch.manual_seed(0)
    centres = torch.randn(args.classes, args.dim) * 2
    data = [centres[c] + torch.randn(args.samples, args.dim) for c in range(args.classes)]
    ids = list(range(args.classes))
    print(f"{args.classes} classes x {args.samples} samples, d={args.dim}, h={args.hidden}, k={args.latent}, "
          f"{args.epochs} epochs, batch 64, {torch.get_num_threads()} threads")

    start = time.perf_counter()
    _, bank_loss = fit_vae_bank(data, ids, settings, seed=0)
    bank_seconds = time.perf_counter() - start

    n_loop = args.loop_classes or args.classes
    start = time.perf_counter()
    loop_loss = []
    for c in range(n_loop):
        *_, loss = fit_reference_vae(data[c], c, settings, seed=0)
        loop_loss.append(loss)
    loop_seconds = (time.perf_counter() - start) * args.classes / n_loop

    diffs = [abs(a - b) for a, b in zip(bank_loss, loop_loss)]  # the loop's is averaged over batches
    print(f"batched bank      : {bank_seconds:8.1f} s")
    print(f"one VAE at a time : {loop_seconds:8.1f} s" + (f" (measured on {n_loop} classes, scaled)" if n_loop < args.classes else ""))
    print(f"speed-up          : {loop_seconds / bank_seconds:8.2f}x")
    print(f"final-epoch loss per class, bank vs loop: mean {sum(bank_loss[:n_loop]) / n_loop:.3f} vs "
          f"{sum(loop_loss) / n_loop:.3f}, max abs difference {max(diffs):.2e}")


if __name__ == "__main__":
    main()
