"""Device-phase benchmark: the batched device phase against the per-user reference loop, on the same model and data.

    python -m benchmarks.device_phase_cost --dataset=ml-100k --json=out.json
    python -m benchmarks.device_phase_cost --dataset=foursquare_nyc --data_path=../shared/data \
        --config_files=../shared/data/foursquare_nyc/foursquare_nyc.yaml --protocols=incremental --json=fsq.json
    python -m benchmarks.device_phase_cost --dataset=synthetic-ml-1m --json=ml1m.json       # generated on first use
    python -m benchmarks.device_phase_cost --scale=10000,100000,1000000 --json=scale.json   # device phase only

For each case: the batched device phase (``personalise``) of round 1 on every device, on the rows DCCL's settings
give it (``device_data`` and ``device_epochs`` as shipped unless ``--device_data``/``--device_epochs`` say), the
reference loop (``personalise_one_by_one``) on a random sample of ``--loop_users`` devices, its time extrapolated
to all devices (the mean time per device times the number of devices; ``loop_extrapolated`` says so), and the
largest difference between the two on the sampled devices. ``device_phase_gflop`` is the work the device phase needs: the one frozen
forward pass per round that fills the site cache (``site_cache_gflop``, counted by torch's ``FlopCounterMode`` on a
few rows and scaled to all) plus the per-epoch math (``per_epoch_gflop``, counted analytically: the patch and the
item scoring, forward and the backward the metapatch needs, and the local validation passes);
``peak_gflops`` is a large fp32 matmul timed in the same run. ``loop_gflop`` is the loop's work, counted the same
way: it runs the frozen model below the site on every row visit, so ``loop_over_batched_work`` is the part of
``speedup_vs_loop`` that comes from doing less work rather than doing it faster. For RecBole datasets,
``plain_epoch_s`` is one plain training epoch of the backbone over the dataset's whole training set (its own
``calculate_loss``, the trainer's optimizer, as RecBole trains it), timed on ``--plain_batches`` batches and
extrapolated by the number of batches (``plain_epoch_extrapolated``); ``batched_over_plain_epoch`` compares the
device phase with it.

``--scale`` runs the device phase alone on synthetic users (``benchmarks/synthetic.py``, long-tailed, every
interaction a device row) with a small GRU4Rec whose weights are untrained: building RecBole's sequential dataset
for millions of users is not what is measured here, and the cost of the device phase does not depend on the weights.
"""

import argparse
import os
import resource
import tempfile
from time import perf_counter

import numpy as np
import torch
from recbole.data.interaction import Interaction
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import synthetic
from recbole_dccl.files import write_result_file
from recbole_dccl.model.frozen import frozen
from recbole_dccl.quick_start import build
from recbole_dccl.rounds import RoundSchedule, positions_from_newest
from recbole_dccl.trainer.device_phase import LocalData, device_settings, personalise, personalise_one_by_one
from recbole_dccl.trainer.site_cache import SiteCache

SYNTHETIC = {"synthetic-ml-1m": dict(users=6040, total=1_000_000, items=3706, min_per_user=20)}


def peak_gflops(size=2048, repeats=5):
    """The best rate of a ``size`` x ``size`` fp32 matmul: the machine's practical limit right now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = perf_counter()
        a @ b
        best = min(best, perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def per_epoch_gflop(model, local, settings):
    """Matmul work of the device phase's per-epoch math: every training row visit runs the patch and the item
    scores forward and their input gradients backward; every local validation pass runs them forward."""
    patch = next(iter(model.patches.values()))
    dim, rank = patch.base_down.shape
    k = patch.theta_down.shape[0]
    items = model.backbone.n_items
    forward = 2 * dim * rank + 2 * 2 * dim * k * rank + 2 * dim * items
    backward = 2 * dim * k * rank + 2 * dim * items
    train_visits, valid_visits = row_visits(local, settings)
    return (train_visits * (forward + backward) + valid_visits * forward) / 1e9


def row_visits(local, settings):
    """How often the device phase runs the model on a training row and on a held-out row."""
    valid_rows = int(local.is_valid.sum())
    passes = (2 + settings.epochs if settings.select == "best" else 2) if settings.valid_size else 0
    return (len(local.owner) - valid_rows) * settings.epochs, valid_rows * passes


def site_cache_gflop(model, local, settings, sample_rows=256):
    """Work of the frozen forward pass that fills the site cache, from ``sample_rows`` rows; 0 without a cache."""
    with frozen(model):
        cache, _ = SiteCache.probe(model, local.interaction)
        if cache is None or not settings.cache_bytes:
            return 0.0
        sample = local.interaction[:sample_rows]
        with FlopCounterMode(display=False) as counter:
            cache.outputs(model, sample, settings.chunk_size)
    return counter.get_total_flops() / len(sample) * len(local.owner) / 1e9


def measure(name, model, local, settings, loop_users, repeats=1, seed=2020):
    """One benchmark case: batched on all devices (the best of ``repeats`` runs), loop on a sample, compared on
    the sample."""
    devices = len(local.users)
    start = torch.zeros(devices, model.metapatch.shape[1])
    peak = peak_gflops()
    rss_before = peak_rss_mb()
    batched_s = float("inf")
    for _ in range(repeats):
        began = perf_counter()
        batched = personalise(model, local, start, settings, seed)
        batched_s = min(batched_s, perf_counter() - began)
    peak = max(peak, peak_gflops())
    sample = torch.randperm(devices, generator=torch.Generator().manual_seed(seed))[: min(loop_users, devices)]
    began = perf_counter()
    loop = personalise_one_by_one(model, local, start, settings, seed, devices=sample)
    loop_sample_s = perf_counter() - began
    loop_s = loop_sample_s / len(sample) * devices
    epoch_gflop, cache_gflop = per_epoch_gflop(model, local, settings), site_cache_gflop(model, local, settings)
    gflop = epoch_gflop + cache_gflop
    # The loop runs the frozen model below the site again on every row visit, where the batched phase runs it once.
    loop_gflop = epoch_gflop + sum(row_visits(local, settings)) * cache_gflop / len(local.owner)
    return {
        "case": name,
        "users": devices,
        "samples": len(local.owner),
        "device_epochs": settings.epochs,
        "batched_s": batched_s,
        "batched_repeats": repeats,
        "loop_s": loop_s,
        "loop_extrapolated": len(sample) < devices,
        "loop_measured_users": len(sample),
        "loop_measured_s": loop_sample_s,
        "speedup_vs_loop": loop_s / batched_s,
        "max_abs_diff_vs_loop": float((batched.metapatch[sample] - loop.metapatch).abs().max()),
        "adopted_same_as_loop": bool(torch.equal(batched.adopted[sample], loop.adopted)),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "users_per_s": devices / batched_s,
        "device_phase_gflop": gflop,
        "per_epoch_gflop": epoch_gflop,
        "site_cache_gflop": cache_gflop,
        "loop_gflop": loop_gflop,
        "loop_over_batched_work": loop_gflop / gflop,
        "achieved_gflops": gflop / batched_s,
        "peak_gflops": peak,
        "fraction_of_peak": gflop / batched_s / peak,
        "load_average": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }


def plain_epoch(model, trainer, train_data, max_batches):
    """Seconds of one plain backbone training epoch over ``train_data``, from its first ``max_batches`` batches
    (0: all), and whether they were extrapolated. Run after the device phase: it trains the backbone."""
    optimizer = torch.optim.Adam(model.backbone.parameters(), lr=trainer.config["learning_rate"])
    batches = len(train_data) if max_batches <= 0 else min(max_batches, len(train_data))
    model.train()
    began = perf_counter()
    for index, interaction in enumerate(train_data):
        if index == batches:
            break
        loss = model.backbone.calculate_loss(interaction)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = perf_counter() - began
    return {
        "plain_epoch_s": seconds / batches * len(train_data),
        "plain_epoch_rows": len(train_data.dataset),
        "plain_epoch_extrapolated": batches < len(train_data),
        "plain_epoch_measured_batches": batches,
    }


def device_overrides(args):
    """The device settings given on the command line; the others are DCCL's defaults."""
    return {key: value for key, value in (("device_epochs", args.device_epochs), ("device_data", args.device_data))
            if value is not None}


def recbole_case(args, backbone, protocol):
    """DCCL over ``backbone`` on a RecBole dataset, the local data of round 1 of ``protocol``; also the model's
    trainer and training data."""
    config_dict = {
        "backbone": backbone, "protocol": protocol, "MAX_ITEM_LIST_LENGTH": args.max_len, "show_progress": False,
        **device_overrides(args),
    }
    if not args.config_files:
        config_dict["load_col"] = {"inter": ["user_id", "item_id", "timestamp"]}
    if args.dataset in SYNTHETIC:
        folder = args.data_path or os.path.join(tempfile.gettempdir(), "recbole_dccl_synthetic")
        if not os.path.isfile(os.path.join(folder, args.dataset, f"{args.dataset}.inter")):
            synthetic.write_atomic(folder, args.dataset, *synthetic.interactions(**SYNTHETIC[args.dataset]))
        config_dict["data_path"] = folder
    elif args.data_path:
        config_dict["data_path"] = args.data_path
    config_files = args.config_files.split() if args.config_files else None
    config, (train_data, _, _), model, trainer = build(config_dict, dataset=args.dataset, config_file_list=config_files)
    schedule = RoundSchedule(config, train_data)
    settings = device_settings(config)
    local = LocalData.from_rows(schedule.training_rows(schedule.local_rows(1), 1), settings.valid_size, config["device"])
    return model, local, settings, trainer, train_data


def shape_dataset(folder, items):
    """A small atomic dataset in which every item 1..items occurs: the model is built on it."""
    user = np.repeat(np.arange(1, 101), -(-items // 100))[:items]
    synthetic.write_atomic(folder, "shape", user, np.arange(1, items + 1), np.arange(items))
    return folder


def scale_case(args, users, config, token2id):
    """``users`` synthetic users, every interaction a device row (history: the user's previous items)."""
    user, item, _ = synthetic.interactions(users, users * args.scale_rows, args.scale_items, min_per_user=2, seed=users)
    counts = np.bincount(user)[1:]
    position = np.arange(len(user)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = position > 0  # RecBole's sequential rows start at a user's second interaction
    length = np.minimum(position, args.max_len)
    offsets = np.arange(args.max_len)
    source = np.flatnonzero(keep)[:, None] - length[keep][:, None] + offsets
    history = np.where(offsets < length[keep][:, None], item[np.clip(source, 0, len(item) - 1)], 0)
    interaction = Interaction({
        "user_id": torch.from_numpy(user[keep]),
        "item_id_list": torch.from_numpy(token2id[history]),
        "item_length": torch.from_numpy(length[keep]),
        "item_id": torch.from_numpy(token2id[item[keep]]),
    })
    owners, owner = torch.unique(interaction["user_id"], return_inverse=True)
    settings = device_settings(config)
    from_newest = torch.from_numpy(positions_from_newest(user[keep]))
    rows = len(owner)
    return LocalData(interaction, owners, owner, from_newest < settings.valid_size, torch.arange(rows), rows), settings


def build_scale_model(args):
    """A small GRU4Rec DCCL over ``--scale_items`` items, its config, and the model's id of every raw item id."""
    folder = shape_dataset(tempfile.mkdtemp(), args.scale_items)
    config_dict = {
        "backbone": "GRU4Rec", "data_path": folder, "embedding_size": args.scale_dim, "hidden_size": args.scale_dim,
        "MAX_ITEM_LIST_LENGTH": args.max_len, "show_progress": False, **device_overrides(args),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    }
    config, (train_data, _, _), model, _ = build(config_dict, dataset="shape")
    mapping = train_data.dataset.field2token_id["item_id"]
    token2id = np.zeros(args.scale_items + 1, dtype=np.int64)  # raw id 0 is the padding, as the model's
    token2id[1:] = [mapping[str(token)] for token in range(1, args.scale_items + 1)]
    return model, config, token2id


def print_table(records):
    columns = ["case", "users", "samples", "batched_s", "loop_s", "speedup_vs_loop", "max_abs_diff_vs_loop",
               "peak_rss_mb", "users_per_s", "device_phase_gflop", "achieved_gflops", "peak_gflops",
               "loop_over_batched_work", "batched_over_plain_epoch"]
    print(" | ".join(columns))
    for record in records:
        values = [record.get(c, "-") for c in columns]
        print(" | ".join(f"{value:.3g}" if isinstance(value, float) else str(value) for value in values))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="ml-100k, synthetic-ml-1m, or any RecBole dataset")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--backbones", default="GRU4Rec,SASRec")
    parser.add_argument("--protocols", default="incremental,static")
    parser.add_argument("--config_files", default=None, help="RecBole config files, space-separated")
    parser.add_argument("--device_epochs", type=int, default=None, help="default: DCCL's (properties/model/DCCL.yaml)")
    parser.add_argument("--device_data", default=None, choices=("fresh", "all"), help="default: DCCL's")
    parser.add_argument("--max_len", type=int, default=20, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--loop_users", type=int, default=50, help="devices the reference loop is timed on")
    parser.add_argument("--repeats", type=int, default=1, help="batched runs per case; the best is reported")
    parser.add_argument("--plain_batches", type=int, default=10, help="batches a plain epoch is timed on (0: all)")
    parser.add_argument("--scale", default=None, help="comma-separated user counts: the device phase alone")
    parser.add_argument("--scale_rows", type=int, default=5, help="mean interactions per synthetic user")
    parser.add_argument("--scale_items", type=int, default=1000)
    parser.add_argument("--scale_dim", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    records = []
    if args.scale:
        model, config, token2id = build_scale_model(args)
        for users in [int(value) for value in args.scale.split(",")]:
            local, settings = scale_case(args, users, config, token2id)
            records.append(measure(f"synthetic {users} users", model, local, settings, args.loop_users, args.repeats))
            print_table(records[-1:])
    else:
        for backbone in args.backbones.split(","):
            for protocol in args.protocols.split(","):
                model, local, settings, trainer, train_data = recbole_case(args, backbone, protocol)
                record = measure(f"{args.dataset} {backbone} {protocol}", model, local, settings, args.loop_users, args.repeats)
                record.update(plain_epoch(model, trainer, train_data, args.plain_batches))
                record["batched_over_plain_epoch"] = record["batched_s"] / record["plain_epoch_s"]
                records.append(record)
                print_table(records[-1:])
    print_table(records)
    if args.json:
        write_result_file(args.json, records)


if __name__ == "__main__":
    main()
