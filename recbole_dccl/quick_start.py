"""``run_recbole_dccl`` and ``load_data_and_model``: RecBole's ``run_recbole`` and ``load_data_and_model`` with our
config, model and trainer look-ups.

It never imports ``recbole.quick_start`` (which pulls in ray, broken on current numpy and setuptools).
"""

import argparse
import logging
import os
import platform
import sys
from logging import getLogger

import recbole
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed, set_color

from recbole_dccl.config import DCCLConfig
from recbole_dccl.distributed import is_main_process, launch
from recbole_dccl.errors import InputError, NonFiniteLoss
from recbole_dccl.evaluation import group_table
from recbole_dccl.files import load_safe, write_result_file
from recbole_dccl.trainer.checkpoint import READINGS
from recbole_dccl.utils import get_model, get_trainer


def run_recbole_dccl(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, verbose=True):
    """Train and evaluate ``model`` (``DCCL`` or any RecBole model) on ``dataset``; returns RecBole's result dict,
    plus for DCCL the ``cloud_only``, ``dccl_cloud`` and ``dccl_device`` results and the per-phase history."""
    config = DCCLConfig(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    _, (train_data, valid_data, test_data), model = prepare(config, verbose)
    logger = getLogger()
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    show_progress = config["show_progress"] and verbose

    if getattr(model, "is_dccl", False):
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress, test_data=test_data
        )
        result = dict(trainer.report)
        test_result = result["dccl_device"]["test"]
        for name in ("cloud_only", "dccl_cloud", "dccl_device", "deployed_cloud", "deployed_device"):
            reading = result[name]
            logger.info(set_color(f"{name} test result", "yellow") + f" (round {reading['round']} {reading['phase']}): {reading['test']}")
            log_breakdown(logger, f"{name} test result", reading["test_groups"], reading["test_types"])
        logger.info(summary_table(result, trainer.valid_metric))
        for reading, saved_file in trainer.saved_files.items():
            logger.info(
                set_color(f"{reading} model", "blue")
                + f" (round {saved_file['round']} {saved_file['phase']}) saved to {saved_file['path']}"
            )
    else:
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress
        )
        test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=show_progress)
        result = {"test_groups": trainer.group_result, "test_types": trainer.type_result, "test_users": trainer.user_result,
                  "user_groups": trainer.eval_collector.groups.members()}
        logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
        logger.info(set_color("test result", "yellow") + f": {test_result}")
        log_breakdown(logger, "test result", trainer.group_result, trainer.type_result)

    result.update(
        best_valid_score=float(best_valid_score),
        valid_score_bigger=config["valid_metric_bigger"],
        best_valid_result={k: float(v) for k, v in (best_valid_result or {}).items()},
        test_result={k: float(v) for k, v in test_result.items()},
        platform=run_platform(config),
    )
    if config["result_file"] and is_main_process(config):
        write_result_file(config["result_file"], result)
        logger.info(set_color("results written to", "blue") + f": {config['result_file']}")
    return result


def log_breakdown(logger, title, groups, types):
    """The results ``title`` by user group and, where the run has target types, by target type."""
    logger.info(set_color(f"{title} by user group", "yellow") + "\n" + group_table(groups))
    if types:
        logger.info(set_color(f"{title} by target type", "yellow") + "\n" + group_table(types))


# The rows of the summary at the end of a DCCL run's log: (label, key of the trainer's report).
SUMMARY_ROWS = (
    ("cloud-only", "cloud_only"),
    ("DCCL cloud (selected)", "dccl_cloud"),
    ("DCCL cloud (deployed)", "deployed_cloud"),
    ("DCCL device (selected)", "dccl_device"),
    ("DCCL device (deployed)", "deployed_device"),
)


def summary_table(result, metric, test_metrics=3):
    """The end of a DCCL run's log, as plain text: per reading of :data:`SUMMARY_ROWS`, its round and phase, valid
    ``metric``, the first ``test_metrics`` test metrics (``metric`` first) and the change of test ``metric``
    against cloud-only."""
    tested = [metric, *(name for name in result["cloud_only"]["test"] if name != metric)][:test_metrics]
    base = result["cloud_only"]["test"][metric]
    header = ["", "phase", f"valid {metric}", *(f"test {name}" for name in tested), "vs cloud-only"]
    rows = [header]
    for label, key in SUMMARY_ROWS:
        reading = result[key]
        change = f"{100 * (reading['test'][metric] / base - 1):+.1f}%" if base else "n/a"
        values = [reading["valid"][metric], *(reading["test"][name] for name in tested)]
        rows.append([label, f"round {reading['round']} {reading['phase']}", *(f"{value:.4f}" for value in values),
                     "" if key == "cloud_only" else change])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    align = lambda column, cell: cell.ljust(widths[column]) if column < 2 else cell.rjust(widths[column])
    lines = ["  ".join(align(column, cell) for column, cell in enumerate(row)).rstrip() for row in rows]
    title = f"summary (selected: the phase best on valid {metric}; deployed: the model after the last phase)"
    return "\n".join([title, *lines])


def prepare(config, verbose=True):
    """RecBole's start of a run: seeds, the logger (errors only unless ``verbose``), the dataset, its
    dataloaders ``(train, valid, test)`` and the model, freshly initialised on ``config["device"]``."""
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    if not verbose:
        logger.setLevel(logging.ERROR)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    loaders = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, loaders[0].dataset).to(config["device"])
    logger.info(model)
    return dataset, loaders, model


def build(config_dict=None, model="DCCL", dataset="ml-100k", config_file_list=None, verbose=False):
    """``(config, (train, valid, test), model, trainer)`` as a run has them before training starts (a DCCL model
    holding its users' histories): for scripts that drive one phase of the trainer, e.g. the benchmarks."""
    config = DCCLConfig(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    _, loaders, net = prepare(config, verbose)
    if getattr(net, "is_dccl", False):
        net.hold_histories([loader.dataset for loader in loaders])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    return config, loaders, net, trainer


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1,
        ip="localhost", port="5678", group_offset=0):
    """RecBole's ``run``: :func:`run_recbole_dccl` in this process, under torchrun, or in ``nproc`` processes on
    this machine, ranked from ``group_offset`` in a group of ``world_size`` that meets at ``ip:port``
    (docs/distributed.md); returns rank 0's result."""
    kwargs = dict(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict, saved=saved)
    return launch(run_recbole_dccl, kwargs, nproc=nproc, world_size=world_size, ip=ip, port=port, group_offset=group_offset)


# Values RecBole's Config derives itself; given back as input they would be derived twice.
DERIVED_KEYS = (
    "device", "local_rank", "single_spec", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type",
    "train_neg_sample_args", "valid_neg_sample_args", "test_neg_sample_args",
)
# Files only training reads or writes; a loaded model neither needs nor touches them.
TRAINING_FILE_KEYS = ("result_file", "cloud_checkpoint", "resume")


def load_data_and_model(model_file, verbose=True, reading=None):
    r"""RecBole's ``load_data_and_model`` for a checkpoint written through recbole_dccl (``saved/``, of DCCL or of
    any RecBole model), loaded with ``torch.load(weights_only=True)``: a file holding anything but tensors and
    plain values is refused before any of it runs.

    A DCCL run saves two models (:func:`read_checkpoint`): ``model_file`` names the run (either of its files),
    ``reading`` picks the model, ``"deployed"`` (the default: the model after the last phase, what the cloud and
    the devices run) or ``"selected"`` (the phase that scored best in the device view on valid). A DCCL model
    comes in its device view, each user's rows scored with the user's metapatch; set ``model.view = "cloud"`` for
    the cloud model of the same phase. ``verbose=False`` logs errors only.

    Returns:
        tuple: ``(config, model, dataset, train_data, valid_data, test_data)``, as RecBole's.
    """
    return load_from_checkpoint(*read_checkpoint(model_file, reading), verbose)


def read_checkpoint(model_file, reading=None, key="model_file"):
    """``(path, checkpoint)`` of the model ``reading`` of the run that wrote ``model_file`` (named by config
    ``key`` in messages). A DCCL run's two files (trainer/checkpoint.py) each name the other; without ``reading``
    the deployed model is read, since a deployment goes on from it: the devices cannot go back to an earlier
    round. Any other checkpoint holds one model, and ``reading`` is refused for it."""
    if reading is not None and reading not in READINGS:
        raise InputError(f"reading: [{reading}] is not one of {', '.join(READINGS)}.")
    checkpoint = load_safe(model_file, key)
    written = checkpoint.get("reading")
    if written is None:
        if reading is not None:
            model = checkpoint.get("config", {}).get("model")
            raise InputError(
                f"reading: [{reading}] applies to a DCCL run's checkpoints; [{model_file}] holds one model "
                f"(model {model}, no readings): leave reading out."
            )
        return model_file, checkpoint
    reading = reading or "deployed"
    if reading == written:
        return model_file, checkpoint
    path = os.path.join(os.path.dirname(model_file), checkpoint["reading_files"][reading])
    if not os.path.isfile(path):
        raise InputError(
            f"{key}: [{model_file}] is the {written} model of its run, and its {reading} model [{path}] is "
            f"missing; put that file beside it, or read this one (reading: {written})."
        )
    return path, load_safe(path, key)


def load_from_checkpoint(model_file, checkpoint, verbose=True):
    """:func:`load_data_and_model` of ``checkpoint``, read from ``model_file``."""
    config = saved_config(model_file, checkpoint)
    dataset, (train_data, valid_data, test_data), model = prepare(config, verbose)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    if getattr(model, "is_dccl", False):
        model.view = "device"
        model.hold_histories([data.dataset for data in (train_data, valid_data, test_data)])  # as fit() does
    return config, model, dataset, train_data, valid_data, test_data


def saved_config(model_file, checkpoint):
    """The :class:`DCCLConfig` of the run that wrote ``checkpoint`` (read from ``model_file``)."""
    stored = checkpoint.get("config")
    if not isinstance(stored, dict) or "model" not in stored or "state_dict" not in checkpoint:
        raise InputError(f"model_file: [{model_file}] is not a model checkpoint written through recbole_dccl (saved/).")
    settings = {key: value for key, value in stored.items() if key not in DERIVED_KEYS}
    # RecBole stores data_path joined with the dataset name.
    if os.path.basename(os.path.normpath(settings["data_path"])) == stored["dataset"]:
        settings["data_path"] = os.path.dirname(os.path.normpath(settings["data_path"]))
    settings.update(dict.fromkeys(TRAINING_FILE_KEYS))
    return DCCLConfig(model=stored["model"], dataset=stored["dataset"], config_dict=settings)


def run_platform(config):
    """What a run's numbers depend on besides its settings: the versions it ran on and its thread count (the same
    round 0 trained on another thread count may sum in another order and end as another model)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "recbole": recbole.__version__,
            "threads": torch.get_num_threads(), "device": str(config["device"])}


def parse_args(argv=None):
    """RecBole's command line: ``--model``, ``--dataset``, ``--config_files`` and the distributed flags of
    RecBole's ``run_recbole.py``; every other ``--key=value`` is read by RecBole's ``Config`` from ``sys.argv``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", "-m", type=str, default="DCCL", help="DCCL or any RecBole model")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of a RecBole dataset")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML config files")
    parser.add_argument("--nproc", type=int, default=1, help="processes to start on this machine")
    parser.add_argument("--world_size", type=int, default=-1, help="processes on all machines (default: nproc)")
    parser.add_argument("--ip", type=str, default="localhost", help="address of the machine running rank 0")
    parser.add_argument("--port", type=str, default="5678", help="free port on that machine")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    args, _ = parser.parse_known_args(argv)
    return args


def main(argv=None):
    """The command line; a bad setting or file, or a diverged loss, ends it with its message and status 2."""
    args = parse_args(argv)
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    try:
        run(
            model=args.model, dataset=args.dataset, config_file_list=config_file_list, nproc=args.nproc,
            world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset,
        )
    except (InputError, NonFiniteLoss) as error:
        print(f"run_recbole_dccl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
