"""A round-0 cloud model written by ``benchmarks/quality.py`` (its ``cloud_checkpoint``), loaded for a diagnosis
script with the same data and settings: the probes' shared command line and loading."""

import argparse
import os
import sys

from recbole_dccl.quick_start import build


def parser_for(description, protocol):
    """The shared arguments; a script adds its own before :func:`load`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="GRU4Rec")
    parser.add_argument("--protocol", default=protocol)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--cloud_checkpoint", required=True)
    parser.add_argument("--json", default=None)
    parser.add_argument("--config_files", default=None, help="RecBole config files, space-separated")
    return parser


def load(parser):
    """``args, config, (train, valid, test), model, trainer`` with the checkpoint's cloud model loaded. The extra
    ``--key=value`` arguments go to RecBole's Config and must match the checkpoint's round-0 settings."""
    args, passthrough = parser.parse_known_args()
    if not os.path.isfile(args.cloud_checkpoint):
        parser.error(f"--cloud_checkpoint: [{args.cloud_checkpoint}] is not a file; write one with benchmarks/quality.py")
    settings = {"backbone": args.backbone, "protocol": args.protocol, "seed": args.seed, "show_progress": False,
                "cloud_checkpoint": args.cloud_checkpoint}
    sys.argv = sys.argv[:1] + passthrough  # RecBole's Config reads --key=value from the command line
    config_files = args.config_files.split() if args.config_files else None
    config, data, model, trainer = build(settings, dataset=args.dataset, config_file_list=config_files)
    trainer.verbose = False
    trainer.load_cloud(args.cloud_checkpoint)
    return args, config, data, model, trainer
