"""Every phase of a DCCL run on RecBole's TensorBoard run (``log_tensorboard/``) and, with ``log_wandb: True``, on
Weights & Biases through RecBole's ``WandbLogger``.

Round 0's epochs are on them as RecBole writes them (``Loss/Train``, ``Vaild_score``). After every phase (round 0,
the device phase, MoMoDistill step 1, step 2) these scalars follow, at the step of a global phase counter (0 for
round 0, then 1, 2, ... in the order the phases ran; a resumed run goes on counting where it stopped):

- ``DCCL/valid_<view>/<metric>``: both views' validation metrics after the phase (a view the phase left alone
  keeps its value);
- ``DCCL/loss/device``: the devices' training loss in their last local epoch, mean over devices;
  ``DCCL/loss/momodistill`` and ``DCCL/loss/shared``: step 1's and step 2's mean batch loss in their last epoch;
- ``DCCL/adopted_share``: the share of the round's devices that adopted their patch;
- ``DCCL/seconds/<phase>``: the phase's wall time;
- ``DCCL/round``: the round, with the text ``DCCL/phase`` (``round 1 device``, ...) at the same step.

On Weights & Biases the same names go to one ``wandb.log`` call per phase, with ``phase_step`` as the step.
"""

import math


def phase_scalars(entry, values, seconds):
    """``{tag: value}`` of one phase from its history ``entry``, the ``values`` it measured (``{name: value}``)
    and its wall time in ``seconds`` (``None``: not timed here, as a round 0 loaded from ``cloud_checkpoint``)."""
    scalars = {"DCCL/round": entry["round"]}
    for view in ("cloud", "device"):
        for metric, value in entry[view]["valid"].items():
            scalars[f"DCCL/valid_{view}/{metric}"] = value
    scalars.update({f"DCCL/{name}": value for name, value in values.items() if math.isfinite(value)})
    if seconds is not None:
        scalars[f"DCCL/seconds/{entry['phase']}"] = seconds
    return scalars


def publish_phase(tensorboard, wandb_logger, step, entry, values, seconds):
    """Write one phase's scalars (:func:`phase_scalars`) at ``step`` and flush them to the event file."""
    scalars = phase_scalars(entry, values, seconds)
    for tag, value in scalars.items():
        tensorboard.add_scalar(tag, value, step)
    tensorboard.add_text("DCCL/phase", f"round {entry['round']} {entry['phase']}", step)
    tensorboard.flush()
    wandb_logger.log_metrics({**scalars, "phase_step": step}, head=None)
