"""Patch sites and sizes of DCCL over each backbone, with RecBole's default settings for the backbone.

    python -m benchmarks.patch_sizes --dataset=ml-100k SASRec DIN DeepFM ...

Prints one markdown row per backbone: family, the default patch sites and their widths, what one device learns
and uploads (its metapatch), what a full per-user patch (the same bottlenecks, learned per user without a
metapatch) would hold, and the global shared parameters (Theta and base) of all sites. Extra ``--key=value``
arguments (e.g. ``--metapatch_dim=8``) go to the config.
"""

import argparse
import logging
import sys

from recbole.data import create_dataset
from recbole.utils import init_logger, init_seed

from recbole_dccl.config import DCCLConfig
from recbole_dccl.model.families import family_of
from recbole_dccl.utils import get_model


def sizes(backbone, dataset):
    config = DCCLConfig(model="DCCL", dataset=dataset, config_dict={"backbone": backbone, "show_progress": False})
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logging.getLogger().setLevel(logging.ERROR)
    train_dataset = create_dataset(config).build()[0]
    model = get_model("DCCL")(config, train_dataset)
    rank = config["patch_rank"]
    widths = {name.replace("__", "."): patch.base_down.shape[0] for name, patch in model.patches.items()}
    return {
        "family": family_of(type(model.backbone)).name,
        "sites": widths,
        "per_device": config["metapatch_dim"],
        "per_full_patch": sum(2 * width * rank for width in widths.values()),
        "shared": sum(param.numel() for param in model.patches.parameters()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("backbones", nargs="+")
    args, _ = parser.parse_known_args()
    sys.argv = [sys.argv[0]] + [arg for arg in sys.argv[1:] if arg.startswith("--") and not arg.startswith("--dataset")]
    print("| backbone | family | default patch sites (width) | per device (metapatch) | per full patch | shared (Theta, base) |")
    print("|---|---|---|---|---|---|")
    for backbone in args.backbones:
        row = sizes(backbone, args.dataset)
        sites = ", ".join(f"`{name}` ({width})" for name, width in row["sites"].items())
        print(
            f"| {backbone} | {row['family']} | {sites} | {row['per_device']:,} | {row['per_full_patch']:,} "
            f"| {row['shared']:,} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
