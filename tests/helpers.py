"""Build config, data and model the way run_recbole_dccl does, for tests that need the pieces."""

import os

import torch

from recbole_dccl import quick_start
from recbole_dccl.rounds import RoundSchedule


def build(config_dict, model="DCCL", dataset="tiny", config_file_list=None):
    """:func:`recbole_dccl.quick_start.build` on the tests' own data by default."""
    return quick_start.build(config_dict, model, dataset, config_file_list)


def device_phase_metapatch(config_dict, out_dir=None):
    """Build as :func:`build` does and run round 1's device phase; returns the uploaded metapatch table, or on a
    distributed rank saves it to ``out_dir/rank<r>.pt`` (a spawned process cannot hand a tensor back)."""
    config, (train_data, _, _), model, trainer = build(config_dict)
    trainer.verbose = False
    schedule = RoundSchedule(config, train_data)
    trainer.start_round(schedule, 1)
    trainer.device_phase(1, schedule.training_rows(schedule.device_rows(1), 1))
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
