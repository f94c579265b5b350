"""One user's device on ONNX Runtime, from the files of ``python -m recbole_dccl.export --format=onnx --local_data``:

    python -m dccl_device score --model=export/device_model.onnx --metapatch=export/metapatch/7.npz --data=export/local_data/7.npz
    python -m dccl_device train --artifacts=export/device_training --metapatch=export/metapatch/7.npz --data=export/local_data/7.npz --out=trained/7.npz

``score`` scores every row of the user's data (``--out``: the scores as array ``scores``); ``train`` runs the
device phase and writes the metapatch the device keeps (what it uploads). Each prints a JSON report with the time
to load the files and to run, and the process's peak resident memory, before (``peak_rss_after_imports_bytes``:
Python, numpy and onnxruntime) and after the work.
"""

import argparse
import json
import resource
import sys
import time

if __name__ == "__main__":
    # A device has no torch. Where this environment has it, onnxruntime-training's import-time package check
    # imports it to look for ORTModule (287 MiB peak and 1.5-1.9 s before any work, against 63 MiB and 0.13 s
    # without): the program runs as on a device, with torch unimportable, and the check finds no ORTModule.
    sys.modules.setdefault("torch", None)

from dccl_device.files import load_arrays, save_arrays
from dccl_device.scoring import Scorer
from dccl_device.settings import DeviceSettings
from dccl_device.training import data_fields, read_settings, train_metapatch
from dccl_device.upload import encode, upload_bytes


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def score(args):
    started = time.perf_counter()
    scorer = Scorer(args.model)
    metapatch = load_arrays(args.metapatch, ["metapatch"])["metapatch"]
    data = load_arrays(args.data, scorer.features)
    loaded = time.perf_counter()
    scores = scorer(metapatch, data)
    report = {"rows": len(scores), "scores_shape": list(scores.shape), "load_seconds": loaded - started,
              "run_seconds": time.perf_counter() - loaded}
    if args.out:
        save_arrays(args.out, {"scores": scores})
    return report


def train(args):
    started = time.perf_counter()
    start = load_arrays(args.metapatch, ["metapatch"])["metapatch"]
    settings = read_settings(args.artifacts)
    data = load_arrays(args.data, data_fields(settings))
    result = train_metapatch(args.artifacts, start, data, seed=args.seed)
    save_arrays(args.out, {"metapatch": result.metapatch})
    report = {"adopted": result.adopted, "valid_loss_cloud": result.valid_loss_cloud,
              "valid_loss_kept": result.valid_loss_kept, "run_seconds": time.perf_counter() - started}
    if args.upload:
        dtype = DeviceSettings.from_device_part(settings["device"]).upload_dtype
        save_arrays(args.upload, encode(result.metapatch[None], dtype))
        report.update(upload_dtype=dtype, upload_bytes=upload_bytes(len(result.metapatch), dtype))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dccl_device", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    scoring = commands.add_parser("score", help="score the rows of the user's data")
    scoring.add_argument("--model", required=True, help="device_model.onnx")
    scoring.add_argument("--out", help="write the scores here (.npz, array 'scores')")
    training = commands.add_parser("train", help="train the user's metapatch (the device phase)")
    training.add_argument("--artifacts", required=True, help="the device_training folder")
    training.add_argument("--out", required=True, help="write the metapatch the device keeps here (.npz)")
    training.add_argument("--seed", type=int, default=0, help="seed of the random order of the rows")
    training.add_argument("--upload", help="also write what the device sends the cloud here (.npz: 'values', and "
                          "'scale' for int8), in the artifacts' upload_dtype (dccl_device.upload)")
    for command in (scoring, training):
        command.add_argument("--metapatch", required=True, help="the user's metapatch file (.npz, array 'metapatch')")
        command.add_argument("--data", required=True, help="the user's local data (.npz, one array per field)")
    args = parser.parse_args(argv)
    imported = peak_rss_bytes()
    try:
        report = score(args) if args.command == "score" else train(args)
    except (OSError, ValueError) as error:  # a missing or unfit file: its message names it
        print(f"dccl_device {args.command}: {error}", file=sys.stderr)
        return 2
    report.update(peak_rss_after_imports_bytes=imported, peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
