"""Quality benchmark: the plain backbone (cloud only) against DCCL variants, over several seeds.

    python benchmarks/quality.py --dataset=ml-100k --backbone=GRU4Rec --seeds=3 --out=results/q
    python benchmarks/quality.py ... --variant=fast:device_learning_rate=0.1,device_epochs=10 --jobs=4

Each (variant, seed) cell is one ``run_recbole_dccl.py`` run writing its own result file; finished cells are
not run again, so an interrupted benchmark resumes. All variants of a seed share one round-0 cloud model
(``cloud_checkpoint``), so their differences are the devices' and MoMoDistill's alone. Extra ``--key=value``
arguments go to every run. Writes ``summary.json`` and ``summary.md`` (mean and std over seeds) to ``--out``:
NDCG@10 and Hit@10 for sequential backbones, AUC, LogLoss and GAUC for CTR backbones (``--backbone=DeepFM``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "dccl": {},
    "data": {"distill_weight": 0, "device_epochs": 0, "shared_epochs": 0},  # model-over-data: no devices
}
RANKING_METRICS = ("ndcg@10", "hit@10")


def reported_metrics(result):
    """NDCG@10 and Hit@10 of ranking runs; every metric of labeled (CTR) runs: AUC, LogLoss and GAUC."""
    return [metric for metric in RANKING_METRICS if metric in result] or list(result)


def parse_variant(text):
    name, _, settings = text.partition(":")
    overrides = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, overrides


def run_cell(args, passthrough, variant, overrides, seed):
    cell = os.path.join(args.out, "cells", f"{variant}-seed{seed}.json")
    if os.path.isfile(cell):
        return cell
    settings = {
        "model": "DCCL", "dataset": args.dataset, "backbone": args.backbone, "protocol": args.protocol,
        "seed": seed, "result_file": cell, "show_progress": False,
        "cloud_checkpoint": os.path.join(args.out, "cloud", f"{args.backbone}-{args.protocol}-seed{seed}.pth"),
        "checkpoint_dir": os.path.join(args.out, "saved", f"{variant}-seed{seed}"),
        **overrides,
    }
    command = [sys.executable, os.path.join(ROOT, "run_recbole_dccl.py")]
    command += [f"--{key}={value}" for key, value in settings.items()] + passthrough
    log = os.path.join(args.out, "logs", f"{variant}-seed{seed}.log")
    with open(log, "w") as file:
        code = subprocess.call(command, stdout=file, stderr=subprocess.STDOUT, cwd=args.out)
    if code != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {code}); see {log}")
    return cell


def mean_std(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarise(args, variants, seeds):
    cells = {}
    for variant in variants:
        for seed in seeds:
            with open(os.path.join(args.out, "cells", f"{variant}-seed{seed}.json")) as file:
                cells[variant, seed] = json.load(file)
    rows = {}
    first = next(iter(variants))
    rows["cloud_only"] = [cells[first, seed]["cloud_only"] for seed in seeds]
    metrics = reported_metrics(rows["cloud_only"][0]["test"])
    for variant in variants:
        rows[f"{variant} cloud"] = [cells[variant, seed]["dccl_cloud"] for seed in seeds]
        rows[f"{variant} device"] = [cells[variant, seed]["dccl_device"] for seed in seeds]
    summary = {"settings": vars(args), "seeds": seeds, "variants": variants, "metrics": metrics, "rows": {}}
    for name, results in rows.items():
        summary["rows"][name] = {
            split: {metric: mean_std([result[split][metric] for result in results]) for metric in metrics}
            for split in ("valid", "test")
        }
        base = rows["cloud_only"]
        summary["rows"][name]["test_gain_vs_cloud_only"] = {
            metric: mean_std([r["test"][metric] / b["test"][metric] - 1 for r, b in zip(results, base)])
            for metric in metrics
        }
        if all("test_groups" in result for result in results + base):
            tail = [least_active(result) for result in results]
            summary["rows"][name]["tail_test"] = {metric: mean_std([t[metric] for t in tail]) for metric in metrics}
            summary["rows"][name]["tail_test_gain_vs_cloud_only"] = {
                metric: mean_std([t[metric] / least_active(b)[metric] - 1 for t, b in zip(tail, base)]) for metric in metrics
            }
    return summary


def least_active(result):
    """The test metrics of the least-active user group (G1)."""
    return next(values for name, values in result["test_groups"].items() if name.startswith("G1 "))


def markdown(summary):
    metrics, main = summary["metrics"], summary["metrics"][0]
    lines = [
        f"{len(summary['seeds'])} seeds {summary['seeds']}; mean ± std over seeds; gain = per-seed relative change "
        "of test vs the same seed's cloud-only model.",
        "",
        f"| model | valid {main} | " + " | ".join(f"test {m}" for m in metrics) + " | "
        + " | ".join(f"test {m} gain" for m in metrics) + " |",
        "|---" * (2 + 2 * len(metrics)) + "|",
    ]
    fmt = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"
    pct = lambda s: f"{100 * s['mean']:+.1f}% ± {100 * s['std']:.1f}"
    for name, row in summary["rows"].items():
        gain = row["test_gain_vs_cloud_only"]
        lines.append(
            f"| {name} | {fmt(row['valid'][main])} | " + " | ".join(fmt(row["test"][m]) for m in metrics) + " | "
            + " | ".join(pct(gain[m]) for m in metrics) + " |"
        )
    tails = {name: row for name, row in summary["rows"].items() if "tail_test" in row}
    if tails:
        lines += ["", "Least-active user group (G1 of `user_groups`):", "",
                  "| model | " + " | ".join(f"tail test {m}" for m in metrics) + " | "
                  + " | ".join(f"tail {m} gain" for m in metrics) + " |",
                  "|---" * (1 + 2 * len(metrics)) + "|"]
        for name, row in tails.items():
            gain = row["tail_test_gain_vs_cloud_only"]
            lines.append(
                f"| {name} | " + " | ".join(fmt(row["tail_test"][m]) for m in metrics) + " | "
                + " | ".join(pct(gain[m]) for m in metrics) + " |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="GRU4Rec")
    parser.add_argument("--protocol", default="incremental", choices=("incremental", "static"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,key=value (repeatable)")
    parser.add_argument("--only", default=None, help="comma-separated variants to run (default: dccl,data and --variant)")
    args, passthrough = parser.parse_known_args()
    args.out = os.path.abspath(args.out)
    for folder in ("cells", "logs", "cloud", "saved"):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)

    variants = dict(VARIANTS)
    variants.update(parse_variant(text) for text in args.variant)
    if args.only:
        variants = {name: variants[name] for name in args.only.split(",")}
    seeds = [2020 + index for index in range(args.seeds)]
    names = list(variants)
    with ThreadPoolExecutor(args.jobs) as pool:
        # The first variant of each seed trains the shared cloud model; the others wait for it.
        list(pool.map(lambda seed: run_cell(args, passthrough, names[0], variants[names[0]], seed), seeds))
        cells = [(name, seed) for name in names[1:] for seed in seeds]
        list(pool.map(lambda cell: run_cell(args, passthrough, cell[0], variants[cell[0]], cell[1]), cells))

    summary = summarise(args, names, seeds)
    with open(os.path.join(args.out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    table = markdown(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as file:
        file.write(table)
    print(table)


if __name__ == "__main__":
    main()
