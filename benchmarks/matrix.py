"""The results matrix of docs/results.md: every committed quality benchmark (``docs/results/<dataset>-<backbone>-
<protocol>/summary.json``, written by ``benchmarks/quality.py``) as one column, every model as one row.

    python -m benchmarks.matrix docs/results/foursquare_nyc-GRU4Rec-incremental ...

Prints markdown tables: test NDCG@10 (or ``--metric``, e.g. ``gauc`` for CTR backbones; mean over seeds) with the
paired per-user gain over cloud-only and its 95% interval; the same for the least-active fifth of users, and for
repeat and explore targets (where the summaries have target types); the paired gain over the model-over-data cloud
(deployed rows against its deployed model). ``--also``: more variants to show, each as the four rows of a DCCL
variant.
"""

import argparse
import json
import os


def variant_rows(variant, label):
    """The four rows of DCCL variant ``variant``: each view as selected on valid and as deployed."""
    return [(f"{label}, {view}, {reading}", f"{variant} {view}{suffix}")
            for view in ("cloud", "device") for reading, suffix in (("selected", ""), ("deployed", " deployed"))]


ROWS = (  # (label, row name in summary.json)
    ("Pop (global popularity)", "pop"),
    ("Frequency (user's own items)", "frequency"),
    ("RepeatNet", "repeatnet"),
    ("cloud only", "cloud-only"),
    ("model-over-data, selected", "data cloud"),
    ("model-over-data, deployed", "data cloud deployed"),
    *variant_rows("dccl", "DCCL (defaults)"),
    *variant_rows("v2", "DCCL (v2 defaults: no memory)"),
    *variant_rows("v1", "DCCL (v1 defaults)"),
)


def percent(gain):
    low, high = gain["ci95"]
    return f"{100 * gain['gain']:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"


def cell(summary, name, metric, scope):
    row = summary["rows"].get(name)
    if row is None:
        return "not run"
    if scope == "all":
        return f"{row['test'][metric]['mean']:.4f} ({percent(row['paired_gain'][metric])})"
    if scope == "least_active":
        group = row["groups"][summary["groups"][0]]
        return f"{group['test'][metric]['mean']:.4f} ({percent(group['paired_gain'][metric])})"
    if scope == "versus_data":
        versus = row.get("paired_gain_vs_data")
        return percent(versus["all"][metric]) if versus else "—"
    typed = row.get("types", {}).get(scope)  # scope: a target type
    return f"{typed['test'][metric]['mean']:.4f} ({percent(typed['paired_gain'][metric])})" if typed else "not typed"


def types_of(summaries):
    """The target types the summaries report (quality.py's ``types``), in their order."""
    return list(dict.fromkeys(kind for summary in summaries.values() for kind in summary.get("types", {})))


def matrix(summaries, also=(), metric="ndcg@10"):
    titles = list(summaries)
    tables = []
    for scope, heading in (
        ("all", f"Test {metric}, mean over seeds (paired per-user gain over cloud-only [95% CI])"),
        ("least_active", f"Least-active fifth of users: test {metric} (gain over cloud-only [95% CI])"),
        *((kind, f"{kind.capitalize()} targets: test {metric} (gain over cloud-only [95% CI])")
          for kind in types_of(summaries)),
        ("versus_data", f"Paired gain in test {metric} over the model-over-data cloud [95% CI]"),
    ):
        lines = [f"**{heading}**", "", "| model | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
        for label, name in [*ROWS, *(row for variant in also for row in variant_rows(variant, variant))]:
            values = [cell(summaries[title], name, metric, scope) for title in titles]
            if all(value in ("not run", "not typed") for value in values):
                continue
            lines.append(f"| {label} | " + " | ".join(values) + " |")
        if len(lines) > 4:  # a type no folder has a target of (ml-100k's repeat) gets no table
            tables.append("\n".join(lines))
    return "\n\n".join(tables) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="quality.py --out folders holding summary.json")
    parser.add_argument("--also", default="", help="more DCCL variants to show, comma-separated (e.g. all64b01)")
    parser.add_argument("--metric", default="ndcg@10", help="a per-user test metric of the summaries, e.g. gauc")
    args = parser.parse_args()
    summaries = {}
    for folder in args.folders:
        with open(os.path.join(folder, "summary.json")) as file:
            summary = json.load(file)
        seeds = len(summary["seeds"])
        summaries[f"{os.path.basename(os.path.normpath(folder))} ({seeds} seed{'s' * (seeds > 1)})"] = summary
    print(matrix(summaries, [variant for variant in args.also.split(",") if variant], args.metric))


if __name__ == "__main__":
    main()
