"""Hyper-parameter search over any DCCL or backbone key: RecBole's ``run_hyper.py`` for the plugin.

    python run_hyper_dccl.py --model=DCCL --dataset=ml-100k --params_file=dccl.hyper --output_file=dccl.result

``--params_file`` is in RecBole's format, one key a line: ``device_learning_rate choice [0.01,0.1]``,
``distill_weight uniform 0,2``, ``embedding_size quniform 32,128,32``, ``learning_rate loguniform -8,-4`` (the
bounds of its natural logarithm). Any key the model's configuration has can be searched. RecBole's
``HyperTuning`` runs the search with hyperopt (``--algo``: ``exhaustive``, the default, tries every combination of
``choice`` values; ``random`` and ``bayes`` draw ``--max_evals`` trials from any of the four kinds).

The objective is the best validation score (``valid_metric``) of the device view, or of the cloud view with
``--view=cloud``; test results are reported beside it, as RecBole reports them, and never chosen on. Trials that
agree on everything round 0 depends on share one round-0 cloud model (``cloud_checkpoint``, written to
``checkpoint_dir`` as ``DCCL-<dataset>-<backbone>-round0-<digest>.pth`` by the first of them), so a search over
device- and cloud-side keys trains round 0 once. ``recbole.quick_start`` (and so ray) is never imported.
"""

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys

from recbole.trainer import HyperTuning

from recbole_dccl.config import DCCLConfig, setting_rule
from recbole_dccl.errors import InputError, NonFiniteLoss
from recbole_dccl.files import write_atomic
from recbole_dccl.quick_start import run_recbole_dccl
from recbole_dccl.trainer import DCCLTrainer

# RecBole's kinds of search ranges and how many numbers each takes after the key's name.
RANGE_SIZES = {"uniform": 2, "quniform": 3, "loguniform": 2}
ALGOS = ("exhaustive", "random", "bayes")


def read_params_file(path, known_keys):
    """``{key: kind}`` of a params file in RecBole's format, checked line by line before any trial runs: the
    key must be one the configuration has, the kind RecBole's, and its values what that kind takes."""
    if not os.path.isfile(path):
        raise InputError(f"params_file: [{path}] is not a file; give a file of lines such as 'learning_rate loguniform -8,-4'.")
    kinds = {}
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(" ")  # as RecBole splits it
            where = f"params_file: [{path}] line {number} ({line.strip()!r})"
            if len(parts) < 3:
                raise InputError(f"{where}: a line must be 'key kind values', e.g. 'device_epochs choice [5,10]'.")
            key, kind, values = parts[0], parts[1], "".join(parts[2:])  # RecBole joins the values the same way
            if key not in known_keys:
                raise InputError(f"{where}: [{key}] is not a key of this model's configuration.")
            if kind == "choice":
                check_choices(where, key, values)
            elif kind in RANGE_SIZES:
                check_range(where, kind, values)
            else:
                raise InputError(f"{where}: [{kind}] is not a kind RecBole searches; it must be one of {['choice', *RANGE_SIZES]}.")
            kinds[key] = kind
    if not kinds:
        raise InputError(f"params_file: [{path}] names no key to search.")
    return kinds


def check_choices(where, key, values):
    try:
        choices = ast.literal_eval(values)
    except (ValueError, SyntaxError):
        choices = None
    if not isinstance(choices, list) or not choices:
        raise InputError(f"{where}: choice takes a non-empty list of values, e.g. [0.01,0.1].")
    is_valid, valid = setting_rule(key) or (lambda value: True, None)
    for choice in choices:
        if not is_valid(choice):
            raise InputError(f"{where}: {key} [{choice!r}] is not valid; it must be {valid}.")


def check_range(where, kind, values):
    numbers = values.split(",")
    try:
        numbers = [float(number) for number in numbers]
    except ValueError:
        numbers = []
    if len(numbers) != RANGE_SIZES[kind] or numbers[0] >= numbers[1]:
        form = "low,high,q" if kind == "quniform" else "low,high"
        raise InputError(f"{where}: {kind} takes {form} with low < high, as numbers.")


def cloud_checkpoint_for(config):
    """Where the round-0 cloud model of ``config`` goes: one file per setting of everything round 0 depends on."""
    identity = DCCLTrainer.cloud_identity(config)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"DCCL-{config['dataset']}-{config['backbone']}-round0-{digest}.pth"
    return os.path.join(config["checkpoint_dir"], name)


class TrialObjective:
    """RecBole's ``objective_function(config_dict, config_file_list)`` for :class:`HyperTuning`: one training
    run, scored on validation in ``view``."""

    def __init__(self, model, dataset, view):
        self.model, self.dataset, self.view = model, dataset, view

    def __call__(self, config_dict=None, config_file_list=None):
        config_dict = dict(config_dict or {})
        if self.model == "DCCL":
            config = DCCLConfig(model=self.model, dataset=self.dataset, config_file_list=config_file_list, config_dict=config_dict)
            config_dict["cloud_checkpoint"] = cloud_checkpoint_for(config)
        result = run_recbole_dccl(self.model, self.dataset, config_file_list, config_dict, verbose=False)
        if self.view == "cloud":
            chosen = result["dccl_cloud"]
            valid, test = chosen["valid"], chosen["test"]
            score = valid[result["config"]["valid_metric"].lower()]
        else:
            score, valid, test = result["best_valid_score"], result["best_valid_result"], result["test_result"]
        return {
            "model": self.model,
            "best_valid_score": score,
            "valid_score_bigger": result["valid_score_bigger"],
            "best_valid_result": valid,
            "test_result": test,
        }


def check_search(args):
    """Refuse a tool, algorithm or view the search cannot run, naming it."""
    if args.tool != "Hyperopt":
        raise InputError(f"tool: [{args.tool}] is not supported; it must be Hyperopt (RecBole's Ray path imports ray 2.6.3, which fails on current numpy and setuptools).")
    if args.algo not in ALGOS:
        raise InputError(f"algo: [{args.algo}] is not valid; it must be one of {list(ALGOS)}.")
    if args.view == "cloud" and args.model != "DCCL":
        raise InputError(f"view: [cloud] needs model DCCL; model [{args.model}] has one view.")
    if importlib.util.find_spec("hyperopt") is None:
        raise InputError("tool: [Hyperopt] needs the hyperopt package: pip install 'recbole-dccl[hyper]'.")
    if args.algo == "exhaustive" and importlib.metadata.version("hyperopt") != "0.2.5":
        raise InputError(
            f"algo: [exhaustive] is RecBole 1.2.1's search for hyperopt 0.2.5 (installed: "
            f"{importlib.metadata.version('hyperopt')}); pip install 'recbole-dccl[hyper]' installs it."
        )


def search(args):
    """Run the search of ``args`` (:func:`parse_args`); returns RecBole's ``HyperTuning`` after it ran."""
    check_search(args)
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    config = DCCLConfig(model=args.model, dataset=args.dataset, config_file_list=config_files)
    kinds = read_params_file(args.params_file, config.final_config_dict)
    ranges = [key for key, kind in kinds.items() if kind != "choice"]
    if args.algo == "exhaustive" and ranges:
        raise InputError(f"algo: [exhaustive] tries every choice and cannot search ranges ({ranges}); use --algo=random or --algo=bayes.")
    tuner = HyperTuning(
        TrialObjective(args.model, args.dataset, args.view), params_file=args.params_file, fixed_config_file_list=config_files,
        display_file=args.display_file, algo=args.algo, max_evals=args.max_evals or 100, early_stop=args.early_stop,
    )
    if args.max_evals:  # exhaustive search sets it to the number of combinations
        tuner.max_evals = min(tuner.max_evals, args.max_evals)
    tuner.run()
    write_atomic(args.output_file, lambda temporary: tuner.export_result(output_file=temporary))
    return tuner


def parse_args(argv=None):
    """RecBole's ``run_hyper.py`` flags, plus ``--model``, ``--dataset``, ``--algo``, ``--max_evals``,
    ``--early_stop`` and ``--view``; other ``--key=value`` flags are read by RecBole's ``Config`` and hold in every trial."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="DCCL", help="DCCL or any RecBole model")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="name of a RecBole dataset")
    parser.add_argument("--config_files", default=None, help="space-separated YAML config files every trial uses")
    parser.add_argument("--params_file", required=True, help="the keys to search and their ranges, in RecBole's format")
    parser.add_argument("--output_file", default="hyper_example.result", help="every trial's valid and test results")
    parser.add_argument("--display_file", default=None, help="an HTML plot of the trials (plotly)")
    parser.add_argument("--tool", default="Hyperopt", help="Hyperopt (RecBole's Ray path is not supported)")
    parser.add_argument("--algo", default="exhaustive", help="exhaustive, random or bayes")
    parser.add_argument("--max_evals", type=int, default=None, help="at most this many trials (random, bayes: default 100)")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without a better score")
    parser.add_argument("--view", default="device", choices=["device", "cloud"], help="the DCCL view whose valid score is the objective")
    args, _ = parser.parse_known_args(argv)
    return args


def main(argv=None):
    """The command line; a bad setting or params file, or a diverged loss, ends it with its message and status 2."""
    try:
        tuner = search(parse_args(argv))
    except (InputError, NonFiniteLoss) as error:
        print(f"hyper: error: {error}", file=sys.stderr)
        return 2
    print("best params: ", tuner.best_params)
    print("best result: ")
    print(tuner.params2result[tuner.params2str(tuner.best_params)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
