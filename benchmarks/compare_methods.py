"""Compare methods over seeds on the prepared data, backbone and embeddings of the
current params (run `dvc repro` first). Calls the same step functions as the DVC stages;
each seed's split, generators and replay are shared by the methods, each (seed, method)
writes its own prompts and evaluations under --out. Prints a markdown table of
mean +- std over seeds.

    python -m benchmarks.compare_methods --seeds 0 1 2 --methods zeroshot sequential cgil clap joint probe
    python -m benchmarks.compare_methods --methods clap --label sgd -- method.head.optimizer=sgd

Every method runs the same prompt schedule (the `schedule` group: the demo's under the
default `experiment=demo`), so the table compares them at equal budgets. ``--label`` names a
variant: its runs go to ``<method>-<label>`` beside the others and reuse the seed's
generators and replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline import config
from pipeline.stages._common import replay_index_file, task_file
from pipeline.stages.evaluate import run_evaluate
from pipeline.stages.finetune import run_finetune
from pipeline.stages.generators import run_fit_generators
from pipeline.stages.prompts import run_init_prompts
from pipeline.stages.replay import run_init_replay, run_replay
from pipeline.stages.report import run_report
from pipeline.stages.split import run_split

METRICS = ("average_incremental_accuracy", "last_accuracy", "forgetting", "transfer", "ece_last")
SCORES = ("max_probability", "energy", "sample_variance")


def run(seed: int, method: str, out: Path, extra: list[str], label: str = "") -> dict:
    seed_dir = out / f"seed{seed}"
    run_dir = seed_dir / (f"{method}-{label}" if label else method)
    overrides = [
        f"seed={seed}", f"method={method}",
        f"paths.split={seed_dir}/split.json", f"paths.generators={seed_dir}/generators",
        f"paths.replay={seed_dir}/replay", f"paths.prompts={run_dir}/prompts",
        f"paths.metrics={run_dir}/metrics", f"paths.evaluations={run_dir}/metrics/tasks", f"paths.plots={run_dir}/plots",
        # Comparing methods needs no servable model versions (registering one costs seconds).
        "tracking.register_classifier=false",
        *extra,
    ]
    cfg = config.load(None, overrides)
    n = cfg.split.n_tasks
    if not Path(cfg.paths.split).exists():
        run_split(cfg)
    if cfg.method.train_on == "replay":
        if not replay_index_file(cfg, 0).exists():
            run_init_replay(cfg)
        for task in range(1, n + 1):
            if not task_file(cfg.paths.generators, task).exists():
                run_fit_generators(cfg, task)
            if not replay_index_file(cfg, task).exists():
                run_replay(cfg, task)
    start = time.perf_counter()
    run_init_prompts(cfg)
    for task in range(1, n + 1):
        run_finetune(cfg, task)
        run_evaluate(cfg, task)
    report = with_figures(run_report(cfg))
    report["finetune_seconds"] = time.perf_counter() - start
    return report


def with_figures(report: dict) -> dict:
    """The report with the table's derived columns: per-task finetune seconds, AUROCs."""
    tasks = sorted(report["seconds_per_task"], key=int)
    report["finetune_seconds_per_task"] = [report["seconds_per_task"][t].get("finetune") for t in tasks]
    for score in SCORES:
        report[f"auroc_{score}"] = report["novelty"].get(score, {}).get("auroc")
    return report


def collect(out: Path, seeds: list[int], names: list[str]) -> dict[str, list[dict]]:
    """The reports of runs already under ``out`` (``--table-only``)."""
    from pipeline.io import read_json

    results: dict[str, list[dict]] = {}
    for name in names:
        for seed in seeds:
            path = out / f"seed{seed}" / name / "metrics" / "report_details.json"
            if not path.exists():
                raise SystemExit(f"{path}: no finished run of {name} with seed {seed}")
            results.setdefault(name, []).append(with_figures(read_json(path)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["zeroshot", "sequential", "cgil", "clap", "joint", "probe"])
    parser.add_argument("--label", default="", help="name of a variant (its overrides follow)")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs already under --out")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    swallowed = [m for m in args.methods if "=" in m]
    if swallowed:
        parser.error(f"--methods took the override(s) {swallowed}: put overrides after `--` or before --methods")
    names = {m: f"{m}-{args.label}" if args.label else m for m in args.methods}
    if args.table_only:
        print_table(collect(args.out, args.seeds, list(names.values())), args.seeds)
        return
    results: dict[str, list[dict]] = {names[m]: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            report = run(seed, method, args.out, args.overrides, args.label)
            results[names[method]].append(report)
            figures = [f"{k} {100 * report[k]:.1f}" for k in METRICS]
            figures += [f"AUROC {s} {100 * report[f'auroc_{s}']:.1f}" for s in SCORES if report[f"auroc_{s}"] is not None]
            figures.append("finetune s/task " + " ".join(f"{v:.1f}" for v in report["finetune_seconds_per_task"] if v is not None))
            print(f"seed {seed} {names[method]}: " + ", ".join(figures), flush=True)
    (args.out / f"results{'-' + args.label if args.label else ''}.json").write_text(json.dumps(results, indent=2))
    print_table(results, args.seeds)


def print_table(results: dict[str, list[dict]], seeds: list[int]) -> None:
    def cell(values: list[float | None]) -> str:
        if any(v is None for v in values):
            return "n/a (deterministic)"
        values = [100 * v for v in values]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    print(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}); mean ± std, in %")
    columns = [*METRICS, *(f"auroc_{s}" for s in SCORES)]
    print("| method | avg incremental acc | last acc | forgetting | transfer | ECE (last task) "
          "| novel AUROC max-prob | novel AUROC energy | novel AUROC sample variance |")
    print("| --- " * (len(columns) + 1) + "|")
    for method, reports in results.items():
        print(f"| {method} | " + " | ".join(cell([r[k] for r in reports]) for k in columns) + " |")
    print("\nfinetune seconds per task (mean over seeds):")
    for method, reports in results.items():
        per_task = [statistics.mean(r["finetune_seconds_per_task"][t] or 0.0 for r in reports) for t in range(len(reports[0]["finetune_seconds_per_task"]))]
        print(f"  {method}: " + " ".join(f"{v:.1f}" for v in per_task) + f" (total {sum(per_task):.1f})")


if __name__ == "__main__":
    main()
