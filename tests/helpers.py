"""Build config, data and model the way run_recbole_dccl does, for tests that need the pieces."""

import importlib.util
import logging
import os
import sys

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

from recbole_dccl.config import DCCLConfig
from recbole_dccl.data import RoundSchedule
from recbole_dccl.utils import get_model, get_trainer


def benchmark_module(name):
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package; its scripts import each other
    as they do when run from it)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(config_dict, model="DCCL", dataset="tiny", config_file_list=None):
    config = DCCLConfig(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logging.getLogger().setLevel(logging.ERROR)
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    net = get_model(config["model"])(config, train_data.dataset).to(config["device"])
    if getattr(net, "is_dccl", False):  # as prepare() does
        net.hold_histories([train_data.dataset, valid_data.dataset, test_data.dataset])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    return config, (train_data, valid_data, test_data), net, trainer


def device_phase_metapatch(config_dict, out_dir=None):
    """Build as :func:`build` does and run round 1's device phase; returns the uploaded metapatch table, or on a
    distributed rank saves it to ``out_dir/rank<r>.pt`` (a spawned process cannot hand a tensor back)."""
    config, (train_data, _, _), model, trainer = build(config_dict)
    trainer.verbose = False
    schedule = RoundSchedule(config, train_data)
    trainer._start_round(schedule, 1)
    trainer._device_phase(1, schedule.training_rows(schedule.device_rows(1), 1))
    if out_dir is None:
        return model.uploaded_metapatch.cpu()
    torch.save(model.uploaded_metapatch.cpu(), os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.pt"))


def evaluate_test_data(config_dict, model):
    """Build as :func:`build` does and evaluate the untrained ``model`` on the test data: its result, per-group
    and per-user metrics and every collected tensor (every rank's, on rank 0 of a distributed run)."""
    _, (train_data, _, test_data), _, trainer = build(config_dict, model=model)
    trainer.eval_collector.data_collect(train_data)
    result = trainer.evaluate(test_data, load_best_model=False)
    struct = trainer.eval_collector.last_struct._data_dict
    # numpy arrays: a spawned rank hands its result back through a queue, which shares tensors through files.
    collected = {key: value.numpy() for key, value in struct.items() if isinstance(value, torch.Tensor)}
    return dict(result), trainer.group_result, trainer.user_result, collected
