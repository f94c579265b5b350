"""Cloud-phase cost: one MoMoDistill (step 1) epoch against one plain backbone epoch on the same data, in one run,
and the cost of one step-2 epoch.

    python -m benchmarks.cloud_phase_cost --dataset=ml-100k --json=cloud.json

The data is what the cloud learns from in round 1 (``--protocol``: the devices' rows), after round 1's device
phase has run on it. The plain epoch is the backbone's own ``calculate_loss`` with the same optimizer, as RecBole
trains it; the MoMoDistill epoch adds the frozen device teachers and the KL term. The teachers run from the site
outputs the device phase kept, as in a run (``momodistill_epoch_s``), and from scratch (``..._uncached``: a run
with ``device_cache_mb: 0`` or a backbone whose sites cannot be cached). Step 2 trains Theta and the auxiliary
encoder, W_f frozen: its first epoch computes the site outputs of the new W_f (``shared_first_epoch_s``), the
others replay them (``shared_epoch_s``). Each epoch is timed ``--repeats`` times, interleaved, and the fastest kept.
"""

import argparse
import json
import os
from time import perf_counter

import torch

from recbole_dccl.files import write_result_file
from recbole_dccl.quick_start import build
from recbole_dccl.rounds import RoundSchedule
from recbole_dccl.trainer.momodistill import DeviceTeachers, _run_epoch, distill_cloud_epoch, shared_parameters_epoch


def timed(run):
    start = perf_counter()
    run()
    return perf_counter() - start


def measure(args, backbone):
    config_dict = {"backbone": backbone, "protocol": args.protocol, "MAX_ITEM_LIST_LENGTH": args.max_len,
                   "show_progress": False}
    config, (train_data, _, _), model, trainer = build(config_dict, dataset=args.dataset)
    trainer.verbose = False
    rows = trainer.start_round(RoundSchedule(config, train_data), 1)
    loader = trainer.round.loader
    trainer.device_phase(1, rows)  # fills the round's cache for the teachers
    with torch.no_grad():  # devices as if they had all adopted a patch: every teacher row patched
        model.uploaded_metapatch.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    teachers = DeviceTeachers(model, cache=trainer.round.cache)
    uncached_teachers = DeviceTeachers(model)
    cloud_optimizer = torch.optim.Adam(model.backbone.parameters(), lr=config["learning_rate"])
    shared = list(model.patches.parameters()) + list(model.encoder.parameters())
    shared_optimizer = torch.optim.Adam(shared, lr=config["shared_learning_rate"])
    weight = config["distill_weight"]

    def plain_epoch():
        model.train()
        _run_epoch(model, loader, cloud_optimizer, model.backbone.calculate_loss, config, "Plain")

    shared_cache = None

    def shared_epoch(first):
        nonlocal shared_cache
        if first:  # a new W_f: step 2 starts with nothing cached
            shared_cache = trainer.row_cache()
        shared_parameters_epoch(model, loader, shared_optimizer, teachers, config, shared_cache)

    epochs = {
        "plain_epoch_s": plain_epoch,
        "momodistill_epoch_s": lambda: distill_cloud_epoch(model, loader, cloud_optimizer, teachers, weight, config),
        "momodistill_uncached_epoch_s": lambda: distill_cloud_epoch(
            model, loader, cloud_optimizer, uncached_teachers, weight, config
        ),
        "shared_first_epoch_s": lambda: shared_epoch(first=True),
        "shared_epoch_s": lambda: shared_epoch(first=False),
    }
    best = {name: float("inf") for name in epochs}
    for _ in range(args.repeats):
        for name, run in epochs.items():
            best[name] = min(best[name], timed(run))
    return {
        "case": f"{args.dataset} {backbone} {args.protocol}",
        "rows": len(loader.dataset),
        **best,
        "momodistill_over_plain": best["momodistill_epoch_s"] / best["plain_epoch_s"],
        "momodistill_uncached_over_plain": best["momodistill_uncached_epoch_s"] / best["plain_epoch_s"],
        "shared_over_plain": best["shared_epoch_s"] / best["plain_epoch_s"],
        "shared_first_over_plain": best["shared_first_epoch_s"] / best["plain_epoch_s"],
        "load_average": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbones", default="GRU4Rec,SASRec")
    parser.add_argument("--protocol", default="incremental", help="incremental: the fresh rows; static: every training row")
    parser.add_argument("--max_len", type=int, default=20, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    records = []
    for backbone in args.backbones.split(","):
        records.append(measure(args, backbone))
        print(json.dumps(records[-1]))
    if args.json:
        write_result_file(args.json, records)


if __name__ == "__main__":
    main()
