"""Every phase of a DCCL run on TensorBoard (read back with tensorboard's event reader) and on Weights & Biases
through RecBole's WandbLogger (here a stand-in ``wandb`` module that records what it is given)."""

import glob
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recbole_dccl.quick_start import run_recbole_dccl

PHASES = [(0, "cloud"), (1, "device"), (1, "momodistill"), (1, "shared"), (2, "device"), (2, "momodistill"), (2, "shared")]


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module that keeps every ``wandb.log`` call."""
    module = types.ModuleType("wandb")
    module.run, module.logged = None, []
    module.init = lambda **kwargs: setattr(module, "run", types.SimpleNamespace(summary={}))
    module.define_metric = lambda *args, **kwargs: None
    module.log = lambda metrics, commit=True: module.logged.append(dict(metrics))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def steps_of(events):
    return [event.step for event in events]


def test_every_phase_goes_to_tensorboard_and_wandb(tiny_config, fake_wandb):
    result = run_recbole_dccl("DCCL", "tiny", config_dict={**tiny_config, "rounds": 2, "log_wandb": True}, saved=False, verbose=False)
    assert [(entry["round"], entry["phase"]) for entry in result["history"]] == PHASES
    (run,) = glob.glob("log_tensorboard/*")
    events = EventAccumulator(run)
    events.Reload()
    scalars = lambda tag: events.Scalars(tag)

    assert len(scalars("Loss/Train")) == tiny_config["epochs"]  # RecBole's own round-0 curves stay
    every_phase = list(range(len(PHASES)))
    for view in ("cloud", "device"):
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            tag = f"DCCL/valid_{view}/{metric}"
            assert steps_of(scalars(tag)) == every_phase
            expected = [entry[view]["valid"][metric] for entry in result["history"]]
            assert [event.value for event in scalars(tag)] == pytest.approx(expected, abs=1e-6)
    assert [event.value for event in scalars("DCCL/round")] == [round_idx for round_idx, _ in PHASES]
    text = [event.tensor_proto.string_val[0].decode() for event in events.Tensors("DCCL/phase/text_summary")]
    assert text == [f"round {round_idx} {phase}" for round_idx, phase in PHASES]

    for phase in ("device", "momodistill", "shared"):
        at = [step for step, (_, name) in enumerate(PHASES) if name == phase]
        assert steps_of(scalars(f"DCCL/loss/{phase}")) == at
        assert all(0 < event.value < 10 for event in scalars(f"DCCL/loss/{phase}"))
        assert steps_of(scalars(f"DCCL/seconds/{phase}")) == at
    assert steps_of(scalars("DCCL/seconds/cloud")) == [0]
    shares = [event.value for event in scalars("DCCL/adopted_share")]
    assert steps_of(scalars("DCCL/adopted_share")) == [1, 4] and all(0 < share < 1 for share in shares)

    per_phase = [metrics for metrics in fake_wandb.logged if "phase_step" in metrics]
    assert [metrics["phase_step"] for metrics in per_phase] == every_phase
    for step, metrics in enumerate(per_phase):
        for tag, value in metrics.items():
            if tag != "phase_step":
                assert scalars(tag)[steps_of(scalars(tag)).index(step)].value == pytest.approx(value, abs=1e-6)
    assert any("train/train_loss" in metrics for metrics in fake_wandb.logged)  # RecBole's round-0 logging too
