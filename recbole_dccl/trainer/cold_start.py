"""Cold start: serving users the cloud has never trained on (``cold_start_ratio``).

The cold users sit out round 0 and every round (:class:`recbole_dccl.rounds.RoundSchedule`). After the rounds
they arrive with the rows their device holds, and each cold device is scored (device view, ``cold`` user group)
from four starting points:

- ``zero``: the zero metapatch, i.e. the cloud model as the rounds left it;
- ``zero_finetuned``: the zero metapatch trained locally by the device phase (:func:`personalise`, with its local
  validation guard) on the device's rows;
- ``encoder``: the auxiliary encoder's metapatch from the user's profile and a summary of the device's data
  (no metapatch was ever uploaded, so that input is zero);
- ``encoder_finetuned``: the encoder's metapatch trained locally like ``zero_finetuned``.

``cloud_only`` is the round-0 model on the same users. The model's metapatches are restored afterwards: the
stage measures, it does not change what the trainer selects and saves.
"""

from time import time

import torch

from recbole_dccl.trainer.device_phase import LocalData, device_settings, personalise

COLD_GROUP = "cold"
STARTS = ("zero", "encoder")


def cold_start_report(trainer, schedule, seed):
    """``{'users': n, 'cloud_only': {...}, 'zero': {...}, ...}``: valid (and test) metrics of the cold group, and
    how many cold devices kept their fine-tuned patch."""
    start_time = time()
    model = trainer.model
    settings = device_settings(trainer.config)
    arrival = schedule.rounds + 1  # the cold users arrive after the rounds
    rows = schedule.training_rows(schedule.cold_rows(), arrival)
    local = LocalData.from_rows(rows, settings.valid_size, trainer.device)
    users = local.users
    with torch.no_grad():
        starts = {"encoder": model.encode_metapatch(users)}
    starts["zero"] = torch.zeros_like(starts["encoder"])
    kept = model.metapatch[users].clone()

    first = trainer.record.history[0]["cloud"]
    report = {"users": len(users), "cloud_only": _cold_scores(first)}
    try:
        for name in STARTS:
            finetuned = personalise(model, local, starts[name], settings, seed)
            for variant, metapatch in ((name, starts[name]), (f"{name}_finetuned", finetuned.metapatch)):
                model.metapatch[users] = metapatch
                report[variant] = _cold_scores(trainer.score_view("device"))
            report[f"{name}_finetuned"]["adopted"] = int(finetuned.adopted.sum())
    finally:
        model.metapatch[users] = kept
    trainer.record.phase_seconds["cold start"] = time() - start_time
    return report


def _cold_scores(scores):
    """The cold group's metrics out of a view's scores."""
    return {
        split: {key: value for key, value in scores[f"{split}_groups"][COLD_GROUP].items() if key != "users"}
        for split in ("valid", "test")
        if f"{split}_groups" in scores
    }


def cold_start_table(report, metric):
    """The report as log lines: one per starting point, valid and test ``metric``."""
    lines = [f"cold start, {report['users']} users never trained on by the cloud:"]
    for name, scores in report.items():
        if name == "users":
            continue
        values = "    ".join(f"{split} {metric}: {scores[split][metric]:.4f}" for split in ("valid", "test") if split in scores)
        adopted = f"    adopted their patch: {scores['adopted']}" if "adopted" in scores else ""
        lines.append(f"{name:<18} {values}{adopted}")
    return "\n".join(lines)
