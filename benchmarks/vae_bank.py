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
from pipeline.method.generators import cache_sized_chunk, fit_bank, fit_vae_bank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--latent", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--chunk-classes", type=int, nargs="*", default=[],
                        help="also time the bank fitted this many classes at a time (generator.chunk_classes)")
    parser.add_argument("--loop-classes", type=int, default=None,
                        help="fit only this many classes in the loop and scale its time up (default: all)")
    args = parser.parse_args()
    settings = VaeGenerator(name="vae", hidden=args.hidden, latent=args.latent, epochs=args.epochs,
                            batch_size=64, lr=2e-4)
    torch.manual_seed(0)
    centres = torch.randn(args.classes, args.dim) * 2
    data = [centres[c] + torch.randn(args.samples, args.dim) for c in range(args.classes)]
    ids = list(range(args.classes))
    print(f"{args.classes} classes x {args.samples} samples, d={args.dim}, h={args.hidden}, k={args.latent}, "
          f"{args.epochs} epochs, batch 64, {torch.get_num_threads()} threads")

    default_chunk = min(args.classes, cache_sized_chunk(settings, args.dim))
    start = time.perf_counter()
    bank_loss = fit_bank({c: data[c] for c in ids}, settings, seed=0).fit_loss
    bank_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fit_vae_bank(data, ids, settings, seed=0)
    whole_seconds = time.perf_counter() - start

    chunked = {}
    for chunk in args.chunk_classes:
        start = time.perf_counter()
        fit_bank({c: data[c] for c in ids}, settings, seed=0, chunk_classes=chunk)
        chunked[chunk] = time.perf_counter() - start

    n_loop = args.loop_classes or args.classes
    start = time.perf_counter()
    loop_loss = []
    for c in range(n_loop):
        *_, loss = fit_reference_vae(data[c], c, settings, seed=0)
        loop_loss.append(loss)
    loop_seconds = (time.perf_counter() - start) * args.classes / n_loop

    diffs = [abs(a - b) for a, b in zip(bank_loss, loop_loss)]  # the loop's is averaged over batches
    print(f"batched bank, as the pipeline fits it ({default_chunk} classes at a time): {bank_seconds:8.1f} s")
    print(f"batched bank, all {args.classes} classes at once: {whole_seconds:8.1f} s, {loop_seconds / whole_seconds:.2f}x the loop")
    print(f"one VAE at a time : {loop_seconds:8.1f} s" + (f" (measured on {n_loop} classes, scaled)" if n_loop < args.classes else ""))
    print(f"speed-up of the pipeline's bank over the loop: {loop_seconds / bank_seconds:8.2f}x")
    for chunk, seconds in chunked.items():
        print(f"bank, {chunk:3d} classes at a time: {seconds:8.1f} s, {loop_seconds / seconds:.2f}x the loop")
    # Forward + backward of one VAE step: 3 x 2 x (multiply-adds of the six linear layers).
    macs = args.hidden * (args.dim + args.hidden + 2 * args.latent + args.latent + args.hidden + args.dim)
    steps = args.classes * args.epochs * -(-args.samples // 64)
    flops = 6 * macs * 64 * steps
    print(f"arithmetic: {flops / 1e12:.2f} TFLOP for either; loop {flops / loop_seconds / 1e9:.0f} GFLOP/s, "
          f"bank {flops / bank_seconds / 1e9:.0f} GFLOP/s (a 10x speed-up would need {10 * flops / loop_seconds / 1e9:.0f})")
    print(f"final-epoch loss per class, bank vs loop: mean {sum(bank_loss[:n_loop]) / n_loop:.3f} vs "
          f"{sum(loop_loss) / n_loop:.3f}, max abs difference {max(diffs):.2e}")


if __name__ == "__main__":
    main()
