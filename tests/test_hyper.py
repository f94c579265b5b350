"""run_hyper_dccl.py: RecBole's HyperTuning over DCCL keys, one round 0 for trials that share it, valid-only objective."""

import glob
import os
import re
import sys

import pytest
import yaml
from recbole.utils import dict2str

from recbole_dccl import hyper
from recbole_dccl.trainer import DCCLTrainer
from tests.conftest import TINY_SETTINGS


@pytest.fixture
def fixed_config(tiny_data, tmp_path):
    """A YAML file of the settings every trial shares."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_SETTINGS, "data_path": tiny_data, "checkpoint_dir": str(tmp_path / "saved")}))
    return str(path)


@pytest.fixture
def runs(monkeypatch):
    """What each trial's run returned, and how many times round 0 was trained."""
    seen = {"results": [], "round0": 0}
    run, train_cloud = hyper.run_recbole_dccl, DCCLTrainer._train_cloud

    def recorded_run(*args, **kwargs):
        seen["results"].append(run(*args, **kwargs))
        return seen["results"][-1]

    def counted_train_cloud(self, *args):
        seen["round0"] += 1
        return train_cloud(self, *args)

    monkeypatch.setattr(hyper, "run_recbole_dccl", recorded_run)
    monkeypatch.setattr(DCCLTrainer, "_train_cloud", counted_train_cloud)
    return seen


def params_file(tmp_path, text):
    path = tmp_path / "dccl.hyper"
    path.write_text(text)
    return str(path)


def test_two_trials_share_round_0_and_score_on_valid(fixed_config, runs, tmp_path, capsys):
    params = params_file(tmp_path, "device_learning_rate choice [0.01,0.2]\n")
    output = str(tmp_path / "out" / "dccl.result")
    arguments = ["--dataset=tiny", f"--config_files={fixed_config}", f"--params_file={params}", f"--output_file={output}"]
    assert hyper.main(arguments + ["--max_evals=2"]) == 0

    assert runs["round0"] == 1  # the second trial loaded the first one's round-0 model
    assert len(glob.glob(str(tmp_path / "saved" / "DCCL-tiny-GRU4Rec-round0-*.pth"))) == 1
    assert sorted(result["config"]["device_learning_rate"] for result in runs["results"]) == [0.01, 0.2]
    written = open(output).read()
    for rate in ("0.01", "0.2"):
        assert f"device_learning_rate:{rate}\nValid result:\n" in written
    device_scores = [result["best_valid_score"] for result in runs["results"]]
    best = max(device_scores)
    assert f"best params:  {{'device_learning_rate': {runs['results'][device_scores.index(best)]['config']['device_learning_rate']}}}" in capsys.readouterr().out

    # The cloud view's objective, from the same round 0: the score the trial's cloud view had on valid.
    runs["results"].clear()
    assert hyper.main(arguments + ["--max_evals=1", "--view=cloud"]) == 0
    assert runs["round0"] == 1
    (result,) = runs["results"]
    assert f"Valid result:\n{dict2str(result['dccl_cloud']['valid'])}\n" in open(output).read()
    assert "recbole.quick_start" not in sys.modules  # nor ray


@pytest.mark.parametrize(
    "text, message",
    [
        ("device_learning_rat choice [0.1]", r"line 2 .*: \[device_learning_rat\] is not a key of this model's configuration"),
        ("device_epochs choice [3,-1]", r"line 2 .*: device_epochs \[-1\] is not valid; it must be an integer >= 0"),
        ("distill_weight normal 0,1", r"line 2 .*: \[normal\] is not a kind RecBole searches; it must be one of \['choice', 'uniform', 'quniform', 'loguniform'\]"),
        ("learning_rate loguniform -4", r"line 2 .*: loguniform takes low,high with low < high"),
        ("rounds choice 2", r"line 2 .*: choice takes a non-empty list of values"),
        ("learning_rate loguniform -8,-4", r"algo: \[exhaustive\] tries every choice and cannot search ranges \(\['learning_rate'\]\)"),
    ],
)
def test_a_bad_params_file_is_refused_before_any_trial(fixed_config, runs, tmp_path, capsys, text, message):
    params = params_file(tmp_path, f"device_epochs choice [1,2]\n{text}\n")
    arguments = ["--dataset=tiny", f"--config_files={fixed_config}", f"--params_file={params}"]
    assert hyper.main(arguments) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert error.startswith("hyper: error: ") and runs["results"] == []
    assert not os.path.exists("hyper_example.result")
