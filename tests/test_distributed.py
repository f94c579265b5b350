"""DCCL on two CPU processes (gloo on 127.0.0.1) against one process, with the commands of docs/distributed.md."""

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
import yaml
from torch.utils.data.distributed import DistributedSampler

from recbole_dccl.distributed import launch, padded_samples
from tests.conftest import TINY_SETTINGS, write_dataset
from tests.helpers import device_phase_metapatch, evaluate_test_data
from tests.test_fleet import REALISTIC_FLEET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run_recbole_dccl.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TIMEOUT = 300
# Ranks see different batches in MoMoDistill, as with any change of batch order; the device phase and the
# evaluation are exact.
FINAL_TOLERANCE = 0.03


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run_to_the_end(commands, folder, timeout=TIMEOUT):
    """Start ``commands`` together in ``folder``, wait for all, and check that no process any of them started
    is left; returns their exit codes and outputs."""
    logs = [open(os.path.join(folder, f"launcher{index}.log"), "w+") for index in range(len(commands))]
    launchers = [
        subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        for command, log in zip(commands, logs)
    ]
    started, deadline = set(), time.monotonic() + timeout
    while any(launcher.poll() is None for launcher in launchers):
        for launcher in launchers:
            try:
                started.update(psutil.Process(launcher.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        if time.monotonic() > deadline:
            for process in [*started, *launchers]:
                process.kill()
            pytest.fail(f"{commands} still running after {timeout}s")
        time.sleep(0.1)
    psutil.wait_procs(started, timeout=10)
    left = [process for process in started if process.is_running() and process.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {left}"
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return [launcher.returncode for launcher in launchers], outputs


def dccl_command(*flags):
    return [sys.executable, RUN, "--model=DCCL", "--dataset=tiny", "--config_files=tiny.yaml", *flags]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A folder with dataset ``tiny`` and ``tiny.yaml``, and the one-process run's result; that run trains round 0
    and writes it to ``cloud.pth``, which the distributed runs load, so all runs start round 1 from one model."""
    folder = str(tmp_path_factory.mktemp("distributed"))
    settings = {**TINY_SETTINGS, "data_path": write_dataset(os.path.join(folder, "data")), "gpu_id": "", "rounds": 1}
    with open(os.path.join(folder, "tiny.yaml"), "w") as file:
        yaml.safe_dump(settings, file)
    codes, outputs = run_to_the_end([dccl_command("--cloud_checkpoint=cloud.pth", "--result_file=one.json")], folder)
    assert codes == [0], outputs[0]
    with open(os.path.join(folder, "one.json")) as file:
        return folder, json.load(file)


def assert_agrees_with_one_process(result, one):
    assert result["cloud_only"] == one["cloud_only"]  # the same round-0 model, evaluated on two ranks
    device_phase = lambda run: run["history"][1]
    assert device_phase(result)["phase"] == "device"
    assert device_phase(result)["device"] == device_phase(one)["device"]  # same metapatches, overall and by group
    final = lambda run: run["history"][-1]  # after MoMoDistill steps 1 and 2, trained data-parallel
    for view in ("cloud", "device"):
        for split in ("valid", "test"):
            for metric, value in final(one)[view][split].items():
                assert final(result)[view][split][metric] == pytest.approx(value, abs=FINAL_TOLERANCE), (view, metric)


@pytest.mark.parametrize("samples,world_size", [(5, 2), (7, 3), (2, 3), (6, 3)])
def test_the_padding_is_what_follows_a_ranks_own_samples(samples, world_size):
    for rank in range(world_size):
        sampler = DistributedSampler(list(range(samples)), num_replicas=world_size, rank=rank, shuffle=False)
        dealt = list(sampler)
        kept = dealt[: len(dealt) - padded_samples(SimpleNamespace(sampler=sampler))]
        assert kept == list(range(rank, samples, world_size))


@pytest.mark.parametrize("fleet", [{}, REALISTIC_FLEET], ids=["whole", "realistic"])
def test_device_phase_on_two_processes_gives_the_metapatches_of_one(tiny_config, tmp_path, fleet):
    settings = {**tiny_config, "gpu_id": "", **fleet}
    one = device_phase_metapatch(settings)
    kwargs = {"config_dict": settings, "out_dir": str(tmp_path)}
    launch(device_phase_metapatch, kwargs, nproc=2, ip="127.0.0.1", port=free_port())
    assert bool(one.any())
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), one)  # every rank holds all users' metapatches


def test_sampled_ranking_on_two_processes_gives_the_metrics_of_one(tmp_path):
    """31 users: the second rank's share is padded with a repeat of the first user, which the merge drops."""
    sampled_ranking = {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "uni20"}
    settings = {**TINY_SETTINGS, "data_path": write_dataset(str(tmp_path / "data"), users=31), "gpu_id": "",
                "checkpoint_dir": str(tmp_path / "saved"), "eval_args": sampled_ranking, "metrics": ["NDCG", "GAUC"],
                "user_groups": 3}
    one = evaluate_test_data(settings, "GRU4Rec")
    kwargs = {"config_dict": settings, "model": "GRU4Rec"}
    two = launch(evaluate_test_data, kwargs, nproc=2, ip="127.0.0.1", port=free_port())
    assert set(one[0]) == {"ndcg@10", "gauc", "sampled_auc", "repeat_share@10"}
    assert two[:3] == one[:3]  # overall, per group, per user
    assert one[3].keys() == two[3].keys()
    for key, value in one[3].items():
        np.testing.assert_array_equal(two[3][key], value, err_msg=key)


def assert_run_agrees_with_one_process(command, folder, result_file, one):
    codes, outputs = run_to_the_end([command], folder)
    assert codes == [0], outputs[0]
    with open(os.path.join(folder, result_file)) as file:
        assert_agrees_with_one_process(json.load(file), one)


def test_two_processes_on_one_machine(one_process):
    folder, one = one_process
    command = dccl_command("--nproc=2", "--ip=127.0.0.1", f"--port={free_port()}", "--cloud_checkpoint=cloud.pth",
                           "--result_file=two.json")
    assert_run_agrees_with_one_process(command, folder, "two.json", one)


def test_torchrun(one_process):
    folder, one = one_process
    command = [TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               *dccl_command("--cloud_checkpoint=cloud.pth", "--result_file=torchrun.json")[1:]]
    assert_run_agrees_with_one_process(command, folder, "torchrun.json", one)


def test_a_rank_that_fails_stops_every_process(one_process):
    """Two "machines" (RecBole's --world_size/--group_offset); the second has no copy of the dataset."""
    folder, _ = one_process
    os.makedirs(os.path.join(folder, "empty"), exist_ok=True)
    port = free_port()
    machine = lambda offset, *flags: dccl_command(
        "--world_size=2", "--nproc=1", f"--group_offset={offset}", "--ip=127.0.0.1", f"--port={port}", *flags
    )
    codes, outputs = run_to_the_end([machine(0), machine(1, "--data_path=empty")], folder, timeout=120)
    assert codes[0] != 0 and codes[1] != 0
    assert "tiny" in outputs[1] and "exist" in outputs[1]
