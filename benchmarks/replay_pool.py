"""Fresh replay draws against the fixed pool they replaced, on the demo (design section 2C).

Before the trust issue, replay was chained: each class's 1024 samples were drawn once, at
the class's own task, and copied into every later task's pool, from which each epoch took
its per-class share. Today every epoch draws fresh samples from every seen class's
generator. This runs `clap` with the old rule put back in the sampler (a class's pool of
``--pool`` samples fixed by (seed, the class's task); each epoch a class-balanced subset of
it, seeded by (seed, task, epoch)) beside the fresh-draw runs of ``compare_methods``,
sharing their split, generators and replay indexes, and prints both with the bytes each
rule stores for the 5 tasks.

    python -m benchmarks.replay_pool --seeds 0 1 2 --out outputs/compare
    # the fresh arm: python -m benchmarks.compare_methods --seeds 0 1 2 --methods clap --out outputs/compare

The fixed pool lives only in this benchmark: the product has one replay rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.compare_methods import METRICS, collect, print_table, run
from pipeline.data.split import load_split, task_classes
from pipeline.method import replay
from pipeline.method.generators import load_bank

LABEL = "fixedpool"


def use_fixed_pools(pool_size: int) -> None:
    """Put the chained rule back in ``ReplaySampler.draw``: pools drawn once per (seed,
    class's task), each epoch a per-class subset of them."""
    pools: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def draw(self: replay.ReplaySampler, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = replay.epoch_seed(self.seed, self.task, epoch)
        picker = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        for bank_task, bank in enumerate(self.banks, start=1):
            key = (self.seed, bank_task)
            if key not in pools:
                pools[key] = bank.sample(pool_size, seed=replay.epoch_seed(self.seed, bank_task, 0))
            x, y = pools[key]
            for cid in bank.class_ids:
                rows = torch.nonzero(y == cid).squeeze(1)
                chosen = rows[torch.randperm(len(rows), generator=picker)[: self.per_class]]
                xs.append(x[chosen])
                ys.append(y[chosen])
        x, y = torch.cat(xs), torch.cat(ys)
        order = torch.randperm(len(y), generator=picker)
        return x[order], y[order]

    replay.ReplaySampler.draw = draw


def pool_bytes(seed_dir: Path, pool_size: int) -> int:
    """What the chained rule stored for a seed's tasks: task k's pool held every class seen by
    then, ``pool_size`` float32 embeddings each."""
    split = load_split(seed_dir / "split.json")
    dim = load_bank(next((seed_dir / "generators").glob("*.safetensors"))).dim
    seen = 0
    total = 0
    for task in range(1, split["n_tasks"] + 1):
        seen += len(task_classes(split, task))
        total += seen * pool_size * dim * 4
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pool", type=int, default=1024, help="samples per class in a fixed pool (the old rule's 1024)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs already under --out")
    args = parser.parse_args()
    if not args.table_only:
        use_fixed_pools(args.pool)
        for seed in args.seeds:
            report = run(seed, "clap", args.out, [], LABEL)
            print(f"seed {seed} clap-{LABEL}: " + ", ".join(f"{k} {100 * report[k]:.1f}" for k in METRICS), flush=True)
    print_table(collect(args.out, args.seeds, ["clap", f"clap-{LABEL}"]), args.seeds)
    stored = pool_bytes(args.out / f"seed{args.seeds[0]}", args.pool)
    print(f"\nreplay stored for the tasks: clap, one generator index per task (a few KB); "
          f"clap-{LABEL}, {stored / 1e6:.0f} MB of pools")

if __name__ == "__main__":
    main()
