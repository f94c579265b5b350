"""Quality benchmark: the plain backbone (cloud only) against DCCL and its ablations, over several seeds.

    python -m benchmarks.quality --dataset=ml-100k --backbone=SASRec --seeds=3 --out=results/q
    python -m benchmarks.quality ... --variants=dccl,data,patch --variant=fast:device_epochs=5,device_learning_rate=0.3
    python -m benchmarks.quality --out=docs/results/foursquare_nyc-GRU4Rec-memory --report_only

A folder declares what it measures in its ``benchmark.yaml`` (written at its first run: the arguments above, the
variants it defines with ``--variant`` and the ``--key=value`` settings given to every run; paths in it relative to
the folder the benchmark is run from), so ``--out=<folder>`` alone runs it again, and arguments given beside it
change the declaration (e.g. more ``--variants`` or ``--seeds``). ``--report_only`` writes the summary from the
cells there and runs nothing (a missing cell is an error).

Each (variant, seed) cell is one ``run_recbole_dccl.py`` run writing its own result file, compact JSON compressed
with LZMA (``cells/<variant>-seed<seed>.json.xz``); finished cells are not run again, and a cell cut mid-run goes on
from the run state in its ``saved/<variant>-seed<seed>/`` folder (after its last phase, or its last epoch of round 0
or of a plain model), so an interrupted benchmark resumes. (A cell whose settings changed since it was cut is
refused by ``resume``: delete that folder to start it afresh.) All variants of a seed share one round-0 cloud model
(``cloud_checkpoint``): their differences are the devices' and the cloud update's alone, and every variant is
compared with the cloud-only model of its own seed user by user (a cell whose cloud-only reading differs from its
seed's other cells started from another round 0 and is refused).

Writes to ``--out``: ``summary.json``, ``summary.md`` (mean ± std over seeds, overall, per user group and per target
type, and the paired per-user gain over cloud-only with a 95% bootstrap confidence interval, and over each row named
by ``--versus``), ``groups.png`` (per-group test NDCG@10), ``types.png`` (per target type: repeat or explore, where
the cells hold each user's type) and ``rounds.png`` (test NDCG@10 of both views after every phase). A folder of
baselines alone (plain models train no round 0: run them apart, then copy their cells beside the DCCL cells) gets its
cells and no summary.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import yaml

from recbole_dccl.defaults import dccl_defaults
from recbole_dccl.evaluation import TYPES
from recbole_dccl.files import read_result_file, write_atomic
from recbole_dccl.fleet import FLEET_KEYS
from recbole_dccl.trainer.resume import run_state_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "dccl": {},  # metapatch devices + MoMoDistill, with the shipped defaults (properties/model/DCCL.yaml)
    # Earlier defaults (docs/method.md, "How the defaults were chosen"): v2 before the personal memory (issue 34),
    # v1 before issue 33.
    "v2": {"device_memory": False},
    "v1": {"device_data": "fresh", "metapatch_dim": 16, "device_learning_rate": 0.1, "device_epochs": 20,
           "device_memory": False},
    "data": {"device_method": "none", "cloud_method": "data"},  # model-over-data: incremental training, no devices
    "patch": {"device_method": "patch"},  # a full per-user patch instead of a metapatch
    "selfdistill": {"device_method": "none"},  # MoMoDistill's loss with the cloud model as every device's teacher
    # Plain models (``model`` other than DCCL), trained on every training row, on the same splits and metrics:
    "pop": {"model": "Frequency", "frequency_scope": "global", "epochs": 1},  # global popularity, nothing masked
    "frequency": {"model": "Frequency", "frequency_scope": "user", "epochs": 1},  # each user's own items by count
    "repeatnet": {"model": "RepeatNet"},  # RecBole's repeat-aware sequential model, the round-0 budget
}
# What the benchmark of a folder measures (its data protocol and backbone), as opposed to the method's settings, and
# where a cell's files went: the keys of DCCL.yaml a variant's recorded settings leave out.
BENCHMARK_KEYS = ("backbone", "protocol", "fresh_interactions", "rounds", "cold_start_ratio",
                  "cloud_checkpoint", "resume", "result_file")
RANKING_METRICS = ("ndcg@10", "hit@10", "gauc")  # gauc: sampled ranking (uniN) of CTR backbones
SHARE = "repeat_share@10"  # the share of the users' own items in their top 10 (runs with target_types)
BOOTSTRAP_SAMPLES = 2000
CELL_SUFFIX = ".json.xz"
DECLARATION = "benchmark.yaml"  # what a folder measures: quality.py's arguments, as data
# The declaration's keys, the command line's flags; ``define`` holds ``--variant`` definitions, ``run`` the
# ``--key=value`` settings given to every run.
DECLARED = {"dataset": "ml-100k", "backbone": "GRU4Rec", "protocol": "incremental", "seeds": 3, "first_seed": 2020,
            "variants": ["dccl", "data"], "versus": [], "config_files": None, "define": {}, "run": {}}


def parse_variant(text):
    name, _, settings = text.partition(":")
    return name, dict(item.split("=", 1) for item in settings.split(",") if item)


def run_cell(out, declared, variant, overrides, seed):
    """Run the cell of ``variant`` (its settings ``overrides``) and ``seed`` of the folder ``out`` whose declaration
    is ``declared``, unless it is written already."""
    cell = cell_path(out, variant, seed)
    if os.path.isfile(cell):
        return
    checkpoint_dir = os.path.join(out, "saved", f"{variant}-seed{seed}")
    resume = checkpoint_dir if run_state_files(checkpoint_dir) else None
    backbone, protocol = declared["backbone"], declared["protocol"]
    # Every run works in the folder: paths given relative to here must still find their files there.
    config_files = declared["config_files"] and " ".join(os.path.abspath(path) for path in declared["config_files"].split())
    run = {key: os.path.abspath(value) if key == "data_path" else value for key, value in declared["run"].items()}
    settings = {
        "model": "DCCL", "dataset": declared["dataset"], "backbone": backbone, "protocol": protocol,
        "seed": seed, "result_file": cell, "show_progress": False, "config_files": config_files,
        "cloud_checkpoint": os.path.join(out, "cloud", f"{backbone}-{protocol}-seed{seed}.pth"),
        "checkpoint_dir": checkpoint_dir, "resume": resume,
        # A variant's own setting wins over the same key given to every run (RecBole refuses a key given twice).
        **{key: value for key, value in run.items() if key not in overrides},
        **overrides,
    }
    command = [sys.executable, os.path.join(ROOT, "run_recbole_dccl.py")]
    command += [f"--{key}={value}" for key, value in settings.items() if value is not None]
    log = os.path.join(out, "logs", f"{variant}-seed{seed}.log")
    print(f"{'resuming' if resume else 'running'} {variant} seed {seed} (log: {log})", flush=True)
    with open(log, "w") as file:
        code = subprocess.call(command, stdout=file, stderr=subprocess.STDOUT, cwd=out)
    if code != 0:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {code}); see {log}")
    load_cells(out, finished_variants(out, seed), [seed])  # refuses a cell from another round 0


def cell_path(out, variant, seed):
    return os.path.join(out, "cells", f"{variant}-seed{seed}{CELL_SUFFIX}")


def finished_variants(out, seed):
    """The variants whose cell of ``seed`` is written in ``out``."""
    suffix = f"-seed{seed}{CELL_SUFFIX}"
    return [name[:-len(suffix)] for name in sorted(os.listdir(os.path.join(out, "cells"))) if name.endswith(suffix)]


def check_shared_round0(cells):
    """Every DCCL cell of a seed must have started from the same round-0 cloud model, the seed's shared
    ``cloud_checkpoint``: its gains are paired with that model's per-user results. A round 0 trained again (its
    checkpoint lost) is the same model only with the same code, settings and thread count; a cell whose cloud-only
    reading differs is refused here, before a summary pairs its gains with a model it did not start from."""
    first = {}
    for (variant, seed), cell in cells.items():
        if "cloud_only" not in cell:
            continue  # a plain model (a baseline) has no round 0
        reading = {part: cell["cloud_only"][part] for part in ("valid", "test")}
        name, reference = first.setdefault(seed, (variant, reading))
        if json.dumps(reading, sort_keys=True) != json.dumps(reference, sort_keys=True):  # NaN (a GAUC) equals NaN
            raise ValueError(
                f"seed {seed}: the cells {name} and {variant} started from different round-0 models (cloud-only "
                f"{reference} against {reading}); delete the cell whose round 0 is not the seed's shared one (and its "
                f"saved/ run state) and run it again from the seed's cloud_checkpoint")


def reported_metrics(result):
    """NDCG@10, Hit@10 (and GAUC under sampled ranking) of ranking runs; every metric of labeled (CTR) runs: AUC,
    LogLoss and GAUC."""
    if "ndcg@10" not in result:
        return list(result)
    return [metric for metric in RANKING_METRICS if metric in result]


def load_cells(out, variants, seeds):
    cells = {}
    for variant in variants:
        for seed in seeds:
            cells[variant, seed] = read_result_file(cell_path(out, variant, seed))
    check_shared_round0(cells)
    return cells


def dccl_variants(cells, variants, seeds):
    """The variants whose cells are DCCL runs (the others are plain models: baselines)."""
    return [variant for variant in variants if "cloud_only" in cells[variant, seeds[0]]]


def plain_reading(cell, groups=None):
    """A plain model's result file read as one view: valid at its best epoch, test, per group and per user.
    ``groups``: the DCCL cells' ``{group name: users}``; the cell's groups are renamed to the ones with the same
    users. A sequential baseline beside a CTR backbone counts one training row fewer per user (the first
    interaction is only history), so the same users' group reads ``[15, 60]`` there and ``[16, 61]`` here."""
    test_groups = cell["test_groups"]
    if groups is not None:
        by_users = {tuple(users): name for name, users in cell["user_groups"].items()}
        missing = [name for name, users in groups.items() if tuple(users) not in by_users]
        if missing:
            raise ValueError(f"groups {missing} of the DCCL cells have no group with the same users in a plain cell")
        test_groups = {name: cell["test_groups"][by_users[tuple(users)]] for name, users in groups.items()
                       if by_users[tuple(users)] in cell["test_groups"]}
    return {"valid": cell["best_valid_result"], "test": cell["test_result"], "test_groups": test_groups,
            "test_users": cell["test_users"]}


def model_rows(cells, variants, seeds):
    """``{row name: [one result per seed]}``: cloud-only (of the first DCCL variant), then per DCCL variant its cloud
    and device views as selected on valid and as deployed at the end of its last round (no device rows when the
    variant has no device models), per plain model (a baseline) its one reading."""
    dccl = dccl_variants(cells, variants, seeds)
    rows = {"cloud-only": [cells[dccl[0], seed]["cloud_only"] for seed in seeds]} if dccl else {}
    for variant in variants:
        first = cells[variant, seeds[0]]
        if variant not in dccl:
            reference = (lambda seed: cells[dccl[0], seed]["user_groups"]) if dccl else (lambda seed: None)
            rows[variant] = [plain_reading(cells[variant, seed], reference(seed)) for seed in seeds]
            continue
        views = ("cloud", "device") if first["config"].get("device_method", "metapatch") != "none" else ("cloud",)
        for view in views:
            rows[f"{variant} {view}"] = [cells[variant, seed][f"dccl_{view}"] for seed in seeds]
            if "deployed_cloud" in first:
                rows[f"{variant} {view} deployed"] = [cells[variant, seed][f"deployed_{view}"] for seed in seeds]
    return rows


def mean_std(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_gain(results, baselines, metric, users=None, samples=BOOTSTRAP_SAMPLES, seed=0):
    """Relative gain ``sum(model) / sum(baseline) - 1`` of a per-user test metric over the same users of every
    seed, with a 95% bootstrap interval (users resampled within each seed). ``users``: one set per seed, or None."""
    rng = np.random.default_rng(seed)
    totals = np.zeros((2, samples))
    point = np.zeros(2)
    for index, (result, baseline) in enumerate(zip(results, baselines)):
        model_values = dict(zip(result["test_users"]["users"], result["test_users"][metric]))
        base_values = dict(zip(baseline["test_users"]["users"], baseline["test_users"][metric]))
        kept = [user for user in base_values if user in model_values and (users is None or user in users[index])]
        pairs = np.array([[model_values[user], base_values[user]] for user in kept])
        point += pairs.sum(axis=0)
        draws = rng.integers(0, len(pairs), size=(samples, len(pairs)))
        totals += pairs[draws].sum(axis=1).T
    if point[1] == 0:  # a baseline that scores nothing there (Frequency on explore targets): no relative gain
        return {"gain": float("nan"), "ci95": [float("nan"), float("nan")]}
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = totals[0] / totals[1] - 1
    # A resample whose users all score 0 under both models has no gain (0 / 0): left out. One where only the
    # baseline scores 0 has an unbounded one (+inf), kept: a few explore targets can leave the interval open.
    low, high = np.nanpercentile(gains, [2.5, 97.5])
    return {"gain": float(point[0] / point[1] - 1), "ci95": [float(low), float(high)]}


def seed_gain(results, baselines, metric, group=None):
    """Per-seed relative change, mean ± std over seeds: for metrics without per-user values (labeled evaluation)."""
    value = (lambda r: r["test"][metric]) if group is None else (lambda r: r["test_groups"][group][metric])
    change = mean_std([value(result) / value(baseline) - 1 for result, baseline in zip(results, baselines)])
    return {"gain": change["mean"], "std": change["std"]}


def gain_over(results, baselines, metric, members=None, group=None):
    """The paired per-user gain where the results hold per-user values of ``metric``, else :func:`seed_gain`."""
    if not all(metric in result.get("test_users", {}) for result in results + baselines):
        return seed_gain(results, baselines, metric, group)
    users = None if group is None else [set(seed_members[group]) for seed_members in members]
    return paired_gain(results, baselines, metric, users)


def type_members(rows, seeds):
    """Per seed ``{target type: users}``, from the per-user types of the first row whose results name them (a
    run with ``target_types``; a user's type depends on the data alone, so every row of a seed agrees), or ``None``
    where no row of some seed does."""
    members = []
    for index in range(len(seeds)):
        typed = next((results[index]["test_users"] for results in rows.values()
                      if "type" in results[index].get("test_users", {})), None)
        if typed is None:
            return None
        members.append({kind: [user for user, of in zip(typed["users"], typed["type"]) if of == kind] for kind in TYPES})
    return members


def type_mean(results, metric, members, kind):
    """Mean over seeds (± std) of each seed's mean per-user ``metric`` over the users of target type ``kind``."""
    means = []
    for result, seed_members in zip(results, members):
        values = dict(zip(result["test_users"]["users"], result["test_users"][metric]))
        means.append(float(np.nanmean([values[user] for user in seed_members[kind] if user in values])))
    return mean_std(means)


def summarise(cells, variants, seeds, versus=()):
    rows = model_rows(cells, variants, seeds)
    baselines = rows["cloud-only"]
    metrics = reported_metrics(baselines[0]["test"])
    group_names = list(baselines[0]["test_groups"])
    members = [cells[variants[0], seed]["user_groups"] for seed in seeds]  # groups depend on the data alone
    types = type_members(rows, seeds)
    per_user = [metric for metric in metrics if all(metric in r.get("test_users", {}) for r in baselines)]
    summary = {"seeds": seeds, "variants": variants, "metrics": metrics, "groups": group_names, "rows": {}}
    if types:
        summary["types"] = {kind: [len(seed_members[kind]) for seed_members in types] for kind in TYPES}
    for name, results in rows.items():
        row = {
            split: {metric: mean_std([result[split][metric] for result in results]) for metric in metrics}
            for split in ("valid", "test")
        }
        row["paired_gain"] = {metric: gain_over(results, baselines, metric) for metric in metrics}
        row["groups"] = {}
        for group in group_names:
            row["groups"][group] = {
                "test": {metric: mean_std([result["test_groups"][group][metric] for result in results]) for metric in metrics},
                "paired_gain": {metric: gain_over(results, baselines, metric, members, group) for metric in metrics},
            }
        if types and all("test_users" in result for result in results):
            row["types"] = {
                kind: {
                    "test": {metric: type_mean(results, metric, types, kind) for metric in per_user},
                    "paired_gain": {metric: gain_over(results, baselines, metric, types, kind) for metric in per_user},
                }
                for kind in TYPES
                if all(seed_members[kind] for seed_members in types)  # ml-100k has no repeat target
            }
        share = [result["test"].get(SHARE) for result in results]
        if all(value is not None for value in share):
            row[SHARE] = mean_std(share)
        # The second baseline: the model-over-data cloud of the same seed, read as the row is (deployed rows against
        # its deployed model, every other row against its selected one).
        data_row = "data cloud deployed" if name.endswith(" deployed") and "data cloud deployed" in rows else "data cloud"
        if data_row in rows and not name.startswith("data cloud"):
            row["paired_gain_vs_data"] = {
                scope: {metric: gain_over(results, rows[data_row], metric, members, group) for metric in metrics}
                for scope, group in (("all", None), ("least_active_group", group_names[0]))
            }
        summary["rows"][name] = row
    summary["versus"] = {
        baseline: {name: versus_row(results, rows[baseline], per_user, members, group_names[0], types)
                   for name, results in rows.items() if name != baseline}
        for baseline in versus
    }
    dccl = dccl_variants(cells, variants, seeds)
    summary["settings"] = {variant: variant_settings(cells, variant, seeds) for variant in dccl}
    summary["rounds"] = round_curves(cells, dccl, seeds, metrics[0])
    summary["by_rounds"] = by_rounds(cells, dccl, seeds, metrics[0])
    summary["cold_start"] = cold_start_rows(cells, variants, seeds, metrics)
    fleet = fleet_rows(cells, dccl, seeds, summary)
    if fleet:
        summary["fleet"] = fleet
    return summary


def fleet_rows(cells, variants, seeds, summary):
    """Per DCCL variant, where any variant's fleet is not the whole one: what its devices sent (uploads and bytes
    per round, mean over rounds and seeds), the epsilon after its last round, the device phase's seconds per round,
    and its device view's test metric and gain (deployed)."""
    settings, defaults = summary["settings"], dccl_defaults()
    # The keys that change a run (dp_delta only how its epsilon is reported); a cell run before a key existed ran
    # at its default.
    fleet_keys = [key for key in (*FLEET_KEYS, "device_availability") if key != "dp_delta"]
    if all(settings[v].get(key, defaults[key]) == defaults[key] for v in variants for key in fleet_keys):
        return {}
    main, rows = summary["metrics"][0], {}
    for variant in variants:
        reports = [cells[variant, seed].get("fleet") for seed in seeds]
        if not all(reports):
            continue
        seconds = [value for seed in seeds for phase, value in cells[variant, seed]["phase_seconds"].items()
                   if phase.endswith(" device")]
        deployed = summary["rows"][f"{variant} device deployed"]
        rows[variant] = {
            "uploads_per_round": statistics.fmean(entry["uploaded"] for report in reports for entry in report),
            "upload_bytes_per_device": reports[0][0]["upload_bytes_per_device"],
            "upload_bytes_per_round": statistics.fmean(entry["upload_bytes"] for report in reports for entry in report),
            "epsilon": reports[0][-1].get("epsilon"),
            "delta": reports[0][-1].get("delta"),
            "device_seconds_per_round": statistics.fmean(seconds),
            "device_deployed_test": deployed["test"][main],
            "device_deployed_gain": deployed["paired_gain"][main],
        }
    return rows


def versus_row(results, baselines, metrics, members, least_active, types):
    """Paired per-user gains of ``results`` over another row's ``baselines`` (same seeds): overall, for the least
    active group and per target type."""
    scopes = {"all": None, "least_active_group": [set(seed[least_active]) for seed in members]}
    for kind in TYPES if types else ():
        if all(seed_members[kind] for seed_members in types):
            scopes[kind] = [set(seed_members[kind]) for seed_members in types]
    return {scope: {metric: paired_gain(results, baselines, metric, users) for metric in metrics}
            for scope, users in scopes.items()}


def variant_settings(cells, variant, seeds):
    """The DCCL settings ``variant``'s cells ran with (the keys of DCCL.yaml but :data:`BENCHMARK_KEYS`; a cell run
    before a key existed records none for it), the same in every seed: what the variant's name stands for here."""
    method_keys = [key for key in dccl_defaults() if key not in BENCHMARK_KEYS]
    per_seed = [{key: cells[variant, seed]["config"][key] for key in method_keys if key in cells[variant, seed]["config"]}
                for seed in seeds]
    if any(settings != per_seed[0] for settings in per_seed[1:]):
        raise ValueError(f"the cells of {variant} ran with different settings in different seeds: {per_seed}")
    return per_seed[0]


def round_curves(cells, variants, seeds, metric):
    """Per variant: the phases in order and the mean test ``metric`` of each view after each of them."""
    curves = {}
    for variant in variants:
        histories = [cells[variant, seed]["history"] for seed in seeds]
        phases = [f"{entry['round']}:{entry['phase']}" for entry in histories[0]]
        curves[variant] = {"phases": phases}
        for view in ("cloud", "device"):
            curves[variant][view] = [
                statistics.fmean(history[step][view]["test"][metric] for history in histories) for step in range(len(phases))
            ]
    return curves


def by_rounds(cells, variants, seeds, metric):
    """Per variant and number of rounds R run so far: each view's mean test ``metric`` as selected on valid among
    the phases up to round R, and as deployed at the end of round R."""
    table = {}
    for variant in variants:
        histories = [cells[variant, seed]["history"] for seed in seeds]
        bigger = cells[variant, seeds[0]].get("valid_score_bigger", True)
        table[variant] = {}
        for rounds in range(1, max(entry["round"] for entry in histories[0]) + 1):
            row = {}
            for view in ("cloud", "device"):
                selected, deployed = [], []
                for history in histories:
                    so_far = [entry for entry in history if entry["round"] <= rounds]
                    key = lambda entry: entry[view]["valid"][metric] * (1 if bigger else -1)
                    best = max(so_far, key=key)  # the first of equal scores, as the trainer keeps it
                    selected.append(best[view]["test"][metric])
                    deployed.append(so_far[-1][view]["test"][metric])
                row[view] = {"selected": statistics.fmean(selected), "deployed": statistics.fmean(deployed)}
            table[variant][rounds] = row
    return table


COLD_STARTS = ("cloud_only", "zero", "zero_finetuned", "encoder", "encoder_finetuned")


def cold_start_rows(cells, variants, seeds, metrics):
    """The cold users' metrics from each starting point (runs with ``cold_start_ratio``), and the per-seed gain
    against the same seed's cloud-only model on them."""
    rows = {}
    for variant in variants:
        reports = [cells[variant, seed].get("cold_start") for seed in seeds]
        if not all(reports):
            continue
        for start in COLD_STARTS:
            results = [report[start] for report in reports]
            base = [report["cloud_only"] for report in reports]
            rows[f"{variant} {start}"] = {
                "users": reports[0]["users"],
                **{split: {metric: mean_std([r[split][metric] for r in results]) for metric in metrics} for split in ("valid", "test")},
                "test_gain_vs_cloud_only": {metric: seed_gain(results, base, metric) for metric in metrics},
            }
            if "adopted" in results[0]:
                rows[f"{variant} {start}"]["adopted"] = [r["adopted"] for r in results]
    return rows


def markdown(summary):
    metrics, main = summary["metrics"], summary["metrics"][0]
    fmt = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"
    ci = lambda g: f"[{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]" if "ci95" in g else f"± {100 * g['std']:.1f} per seed"
    gain = lambda g: f"{100 * g['gain']:+.1f}% {ci(g)}" if np.isfinite(g["gain"]) else "—"
    lines = [
        f"{len(summary['seeds'])} seeds {summary['seeds']}; mean ± std over seeds; gain vs the same seed's cloud-only "
        "model: paired per user over all seeds' users with a 95% bootstrap interval [low, high] where the runs hold "
        "per-user values (ranking metrics), else the per-seed relative change, mean ± std.",
        "",
        f"| model | valid {main} | " + " | ".join(f"test {m}" for m in metrics) + " | "
        + " | ".join(f"{m} gain" for m in metrics) + " |",
        "|---" * (2 + 2 * len(metrics)) + "|",
    ]
    for name, row in summary["rows"].items():
        lines.append(
            f"| {name} | {fmt(row['valid'][main])} | " + " | ".join(fmt(row["test"][m]) for m in metrics) + " | "
            + " | ".join(gain(row["paired_gain"][m]) for m in metrics) + " |"
        )
    versus_data = {name: row["paired_gain_vs_data"] for name, row in summary["rows"].items() if "paired_gain_vs_data" in row}
    if versus_data:
        lines += ["", "Gain vs the model-over-data cloud (`data` variant) of the same seed, deployed rows vs its deployed "
                  f"model, other rows vs its selected one; least active: {summary['groups'][0]}:",
                  "", "| model | " + " | ".join(metrics) + " | " + " | ".join(f"least-active {m}" for m in metrics) + " |",
                  "|---" * (1 + 2 * len(metrics)) + "|"]
        for name, gains in versus_data.items():
            scopes = (gains["all"], gains["least_active_group"])
            lines.append(f"| {name} | " + " | ".join(gain(scope[metric]) for scope in scopes for metric in metrics) + " |")
    lines += ["", f"Test {main} by user group (training interactions), gain vs cloud-only:", ""]
    lines.append("| model | " + " | ".join(summary["groups"]) + " |")
    lines.append("|---" * (len(summary["groups"]) + 1) + "|")
    for name, row in summary["rows"].items():
        cells = [
            f"{row['groups'][group]['test'][main]['mean']:.4f} ({gain(row['groups'][group]['paired_gain'][main])})"
            for group in summary["groups"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    typed = {name: row for name, row in summary["rows"].items() if "types" in row}
    if typed:
        counts = ", ".join(f"{kind} {sum(summary['types'][kind])}" for kind in TYPES)
        lines += ["", f"Test {main} by target type (repeat: an item the user has in the training data; explore: a new "
                  f"one; test targets over all seeds: {counts}), gain vs cloud-only; the share of the users' own "
                  "items in their top 10:", "",
                  "| model | " + " | ".join(TYPES) + f" | {SHARE} |", "|---" * (len(TYPES) + 2) + "|"]
        for name, row in typed.items():
            values = [f"{row['types'][kind]['test'][main]['mean']:.4f} ({gain(row['types'][kind]['paired_gain'][main])})"
                      if kind in row["types"] else "—" for kind in TYPES]
            share = fmt(row[SHARE]) if SHARE in row else "—"
            lines.append(f"| {name} | " + " | ".join(values) + f" | {share} |")
    for baseline, table in summary.get("versus", {}).items():
        scopes = list(next(iter(table.values())))
        lines += ["", f"Test {main}: gain vs `{baseline}` of the same seed, paired per user (least active: "
                  f"{summary['groups'][0]}):", "", "| model | " + " | ".join(scopes) + " |", "|---" * (len(scopes) + 1) + "|"]
        for name, gains in table.items():
            lines.append(f"| {name} | " + " | ".join(gain(gains[scope][main]) for scope in scopes) + " |")
    if any(len(table) > 1 for table in summary["by_rounds"].values()):
        lines += ["", f"Test {main} (mean over seeds) after R rounds: selected on valid among the phases so far / "
                  "deployed at the end of round R:", "", "| model | R | cloud selected | cloud deployed | "
                  "device selected | device deployed |", "|---" * 6 + "|"]
        for variant, table in summary["by_rounds"].items():
            for rounds, row in table.items():
                lines.append(f"| {variant} | {rounds} | " + " | ".join(
                    f"{row[view][reading]:.4f}" for view in ("cloud", "device") for reading in ("selected", "deployed")
                ) + " |")
    if summary.get("fleet"):
        lines += ["", f"The fleet (per round, mean over rounds and seeds) and the device view's test {main}, deployed:",
                  "", "| variant | uploads | bytes per device | bytes | epsilon | device phase s | "
                  f"test {main} | gain vs cloud-only |", "|---" * 8 + "|"]
        for variant, row in summary["fleet"].items():
            epsilon = "—" if row["epsilon"] is None else f"{row['epsilon']:.2f} (delta {row['delta']:g})"
            lines.append(
                f"| {variant} | {row['uploads_per_round']:.0f} | {row['upload_bytes_per_device']} | "
                f"{row['upload_bytes_per_round']:,.0f} | {epsilon} | {row['device_seconds_per_round']:.1f} | "
                f"{fmt(row['device_deployed_test'])} | {gain(row['device_deployed_gain'])} |"
            )
    if summary["cold_start"]:
        lines += ["", "Cold-start users (the `cold` group, held out of all cloud training); gain per seed:", "",
                  f"| model | users | valid {main} | " + " | ".join(f"test {m}" for m in metrics) + " | "
                  + " | ".join(f"{m} gain" for m in metrics) + " |",
                  "|---" * (3 + 2 * len(metrics)) + "|"]
        for name, row in summary["cold_start"].items():
            change = row["test_gain_vs_cloud_only"]
            lines.append(
                f"| {name} | {row['users']} | {fmt(row['valid'][main])} | " + " | ".join(fmt(row["test"][m]) for m in metrics)
                + " | " + " | ".join(gain(change[m]) for m in metrics) + " |"
            )
    return "\n".join(lines) + "\n"


def plot(summary, out):
    """``groups.png``: per-group test metric (NDCG@10, or AUC for CTR) of every row; ``types.png``: the same per
    target type (runs with ``target_types``); ``rounds.png``: the same after every phase."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    main = summary["metrics"][0]
    bars(summary["rows"], "groups", summary["groups"], main, "user group (training interactions, least active first)",
         os.path.join(out, "groups.png"))
    typed = {name: row for name, row in summary["rows"].items() if "types" in row}
    if typed:
        kinds = [kind for kind in TYPES if kind in next(iter(typed.values()))["types"]]
        bars(typed, "types", kinds, main, "target type", os.path.join(out, "types.png"))

    figure, axes = pyplot.subplots(figsize=(7, 4))
    # Variants without devices skip phases: place every point at its phase's position in the longest run.
    longest = max(summary["rounds"].values(), key=lambda curve: len(curve["phases"]))["phases"]
    for variant, curve in summary["rounds"].items():
        steps = [longest.index(phase) for phase in curve["phases"]]
        axes.plot(steps, curve["cloud"], marker="o", label=f"{variant} cloud")
        if curve["device"] != curve["cloud"]:
            axes.plot(steps, curve["device"], marker="s", linestyle="--", label=f"{variant} device")
    axes.set_xticks(np.arange(len(longest)), longest, rotation=30, fontsize="small")
    save_figure(figure, axes, "round:phase", f"test {main} (mean over seeds)", os.path.join(out, "rounds.png"))
    if summary.get("fleet"):
        plot_fleet(summary["fleet"], main, os.path.join(out, "fleet.png"))


def plot_fleet(fleet, metric, path):
    """``fleet.png``: each variant's deployed device gain over cloud-only (95% interval), labelled with what a
    device sends per round and the epsilon."""
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(max(6, 1.1 * len(fleet)), 4))
    names = list(fleet)
    gains = [100 * fleet[name]["device_deployed_gain"]["gain"] for name in names]
    low = [100 * fleet[name]["device_deployed_gain"].get("ci95", [np.nan] * 2)[0] for name in names]
    high = [100 * fleet[name]["device_deployed_gain"].get("ci95", [np.nan] * 2)[1] for name in names]
    axes.bar(np.arange(len(names)), gains, yerr=[np.subtract(gains, low), np.subtract(high, gains)], capsize=3,
             label="device view, deployed")
    for index, name in enumerate(names):
        row = fleet[name]
        text = f"{row['upload_bytes_per_device']} B" + ("" if row["epsilon"] is None else f"\neps {row['epsilon']:.1f}")
        axes.annotate(text, (index, 0), ha="center", va="bottom", fontsize="x-small")
    axes.set_xticks(np.arange(len(names)), names, rotation=30, fontsize="small")
    save_figure(figure, axes, "variant", f"test {metric} gain over cloud-only (%)", path)


def bars(rows, part, names, metric, xlabel, path):
    """One bar per row and each of ``names`` in ``row[part]``: its test ``metric``, mean ± std over seeds."""
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    width = 0.8 / len(rows)
    for index, (name, row) in enumerate(rows.items()):
        means = [row[part][key]["test"][metric]["mean"] for key in names]
        stds = [row[part][key]["test"][metric]["std"] for key in names]
        positions = np.arange(len(names)) + (index - (len(rows) - 1) / 2) * width
        axes.bar(positions, means, width, yerr=stds, label=name, capsize=2)
    axes.set_xticks(np.arange(len(names)), [key.replace(" ", "\n", 1) for key in names])
    save_figure(figure, axes, xlabel, f"test {metric} (mean ± std over seeds)", path)


def save_figure(figure, axes, xlabel, ylabel, path):
    from matplotlib import pyplot

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write_report(out, variants, seeds, versus=()):
    summary = summarise(load_cells(out, variants, seeds), variants, seeds, versus)
    with open(os.path.join(out, "summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    table = markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as file:
        file.write(table)
    plot(summary, out)
    return table


def parse_run_settings(arguments):
    """``--key=value`` arguments as ``{key: value}``, numbers and booleans as such, anything else as written."""
    settings = {}
    for argument in arguments:
        if not argument.startswith("--") or "=" not in argument:
            raise SystemExit(f"quality.py: error: [{argument}] is no --key=value setting for the runs")
        key, text = argument[2:].split("=", 1)
        value = yaml.safe_load(text)
        settings[key] = value if isinstance(value, (bool, int, float)) else text
    return settings


def declaration(args, passthrough):
    """The folder's declaration (:data:`DECLARED`'s keys): its ``benchmark.yaml`` where there is one, changed by
    what the command line gives."""
    path = os.path.join(args.out, DECLARATION)
    declared = dict(DECLARED)
    if os.path.isfile(path):
        with open(path) as file:
            declared.update(yaml.safe_load(file))
    for key in ("dataset", "backbone", "protocol", "seeds", "first_seed", "config_files"):
        if getattr(args, key) is not None:
            declared[key] = getattr(args, key)
    for key in ("variants", "versus"):
        if getattr(args, key) is not None:
            declared[key] = [name for name in getattr(args, key).split(",") if name]
    declared["define"] = {**declared["define"], **dict(parse_variant(text) for text in args.variant)}
    declared["run"] = {**declared["run"], **parse_run_settings(passthrough)}
    return declared


def write_declaration(out, declared):
    def write(temporary):
        with open(temporary, "w") as file:
            yaml.safe_dump(declared, file, sort_keys=False, width=120)

    write_atomic(os.path.join(out, DECLARATION), write)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/quality", help=f"the folder; its {DECLARATION} gives the defaults")
    parser.add_argument("--dataset")
    parser.add_argument("--backbone")
    parser.add_argument("--protocol", choices=("incremental", "static"))
    parser.add_argument("--seeds", type=int, help="how many seeds: first_seed, first_seed + 1, ...")
    parser.add_argument("--first_seed", type=int,
                        help="the first seed (run seeds on two machines or processes: --first_seed=2021 --seeds=1)")
    parser.add_argument("--variants", help=f"comma-separated, from {list(VARIANTS)} and --variant")
    parser.add_argument("--variant", action="append", default=[], help="define one: name:key=value,key=value")
    parser.add_argument("--config_files", help="RecBole config files for every run, space-separated")
    parser.add_argument("--versus", help="comma-separated rows of the summary (e.g. 'repeatnet,dccl device deployed') "
                        "that every other row is also compared with, user by user")
    parser.add_argument("--report_only", action="store_true", help="write the summary; run no cell")
    args, passthrough = parser.parse_known_args()
    args.out = os.path.abspath(args.out)
    declared = declaration(args, passthrough)
    defined = {**VARIANTS, **declared["define"]}
    unknown = [name for name in declared["variants"] if name not in defined]
    if unknown:
        parser.error(f"--variants: {unknown} are not defined; defined: {list(defined)}")
    seeds = [declared["first_seed"] + index for index in range(declared["seeds"])]
    if args.report_only:
        missing = [cell_path(args.out, variant, seed) for seed in seeds for variant in declared["variants"]
                   if not os.path.isfile(cell_path(args.out, variant, seed))]
        if missing:
            parser.error(f"--report_only: the folder lacks the cells {missing}")
    else:
        for folder in ("cells", "logs", "cloud", "saved"):
            os.makedirs(os.path.join(args.out, folder), exist_ok=True)
        write_declaration(args.out, declared)
        # The first cell of each seed trains the seed's shared cloud model; the others load it.
        for seed in seeds:
            for variant in declared["variants"]:
                run_cell(args.out, declared, variant, defined[variant], seed)
    if all(defined[variant].get("model", "DCCL") != "DCCL" for variant in declared["variants"]):
        # Baselines run on their own (they train no round 0) to be copied into a folder of DCCL cells.
        print(f"{args.out}: cells of {declared['variants']} written, no summary: every row is paired with a DCCL "
              "variant's cloud-only model; copy the cells into a folder with the same benchmark.yaml and a DCCL variant")
        return
    print(write_report(args.out, declared["variants"], seeds, declared["versus"]))


if __name__ == "__main__":
    main()
