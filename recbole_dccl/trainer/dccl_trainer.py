"""DCCLTrainer: round 0 trains the cloud model as RecBole would; each later round runs the device phase,
MoMoDistill step 1 and step 2, evaluating the cloud and device views after every phase."""

import copy
import os
from time import time

import torch
from recbole.trainer import Trainer
from recbole.utils import dict2str, set_color

from recbole_dccl.config import dccl_defaults
from recbole_dccl.data import RoundSchedule
from recbole_dccl.distributed import (
    DistributedTrainerMixin, gather_user_rows, is_main_process, sum_over_ranks, user_share,
)
from recbole_dccl.evaluation import UserGroupEvaluationMixin
from recbole_dccl.trainer.checkpoint import SafeCheckpointMixin, plain, save_atomic
from recbole_dccl.trainer.cold_start import COLD_GROUP, cold_start_report, cold_start_table
from recbole_dccl.trainer.device_phase import DeviceSettings, LocalData, personalise
from recbole_dccl.trainer.momodistill import DeviceTeachers, distill_cloud_epoch, shared_parameters_epoch


class DCCLTrainer(DistributedTrainerMixin, UserGroupEvaluationMixin, SafeCheckpointMixin, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.optimizer = self._build_optimizer(params=self.model.backbone.parameters())
        # device_method none: no device phase and no step 2; the device view is the cloud view.
        self.has_devices = config["device_method"] != "none"
        self.history = []
        self.phase_seconds = {}
        self.report = None
        self.cold_start = None
        self.verbose, self.show_progress = True, False

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None,
            test_data=None):
        """Run round 0 and the DCCL rounds. Returns RecBole's ``(best_valid_score, best_valid_result)`` of the
        device view; :attr:`report` holds cloud-only, DCCL cloud and DCCL device results and the history. With
        ``test_data``, every phase is also scored on test (selection still uses valid only)."""
        self.verbose, self.show_progress = verbose, show_progress
        self.valid_data, self.test_data = valid_data, test_data
        schedule = RoundSchedule(self.config, train_data)

        self._pretrain_cloud(schedule, train_data, verbose, show_progress, callback_fn)
        self.eval_collector.data_collect(train_data)  # user groups by all training interactions, not round 0's
        if len(schedule.cold_users):
            self.eval_collector.groups.add(COLD_GROUP, schedule.cold_users)
        best = self._record(0, "cloud")
        for round_idx in range(1, self.config["rounds"] + 1):
            device_rows = schedule.device_rows(round_idx)
            loader = schedule.loader(device_rows)
            self.model.user_history = schedule.user_history(round_idx, *self.model.user_history.shape).to(self.device)
            if self.has_devices:
                self._device_phase(round_idx, train_data.dataset, device_rows)
                best = self._record(round_idx, "device", best, changed=("device",))
            teachers = DeviceTeachers(self.model)
            self._momodistill(round_idx, loader, teachers)
            best = self._record(round_idx, "momodistill", best)
            if self.has_devices:
                self._learn_shared_parameters(round_idx, loader, teachers)
                best = self._record(round_idx, "shared", best, changed=("device",))
        if len(schedule.cold_users) and self.has_devices:
            self.cold_start = cold_start_report(self, schedule, train_data.dataset, self.config["seed"] + self.config["rounds"] + 1)
            self._log(cold_start_table(self.cold_start, self.valid_metric))

        self.model.load_state_dict(best["device_state"])
        self.model.view = "device"
        if saved:
            self._save_checkpoint(best["device"]["round"], verbose=verbose)
        self.report = self._report(best)
        self.best_valid_score = best["device"]["score"]
        self.best_valid_result = best["device"]["valid"]
        return self.best_valid_score, self.best_valid_result

    # Phases ---------------------------------------------------------------------------------------------------

    # What round 0's data and model depend on: a shared cloud checkpoint must agree on all of it.
    CLOUD_KEYS = (
        "dataset", "backbone", "protocol", "fresh_interactions", "rounds", "cold_start_ratio", "seed", "MAX_ITEM_LIST_LENGTH",
        "learner", "learning_rate", "weight_decay", "epochs", "train_batch_size", "stopping_step", "valid_metric",
        "embedding_size", "hidden_size", "mlp_hidden_size", "threshold",
    )

    def _pretrain_cloud(self, schedule, train_data, verbose, show_progress, callback_fn):
        """Round 0, or its result loaded from ``cloud_checkpoint``."""
        path = self.config["cloud_checkpoint"]
        if path and os.path.isfile(path):
            self._load_cloud(path)
            return
        self._train_cloud(schedule, train_data, verbose, show_progress, callback_fn)
        if path and is_main_process(self.config):
            state = {key: value for key, value in self.model.state_dict().items() if key.startswith("backbone.")}
            identity = {key: plain(self.config[key]) for key in self.CLOUD_KEYS}
            save_atomic({"identity": identity, "state_dict": state}, path)
            self._log(f"round 0 cloud model written to {path}")

    def _load_cloud(self, path):
        checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        identity = {key: plain(self.config[key]) for key in self.CLOUD_KEYS}
        # A key the file predates had its default value then.
        stored = {key: checkpoint["identity"].get(key, dccl_defaults().get(key)) for key in identity}
        differs = {key: (value, identity[key]) for key, value in stored.items() if identity[key] != value}
        if differs:
            raise ValueError(
                f"cloud_checkpoint: [{path}] was trained with other settings (file value, this run): {differs}"
            )
        self.model.load_state_dict(checkpoint["state_dict"], strict=False)
        self._log(f"round 0: cloud model loaded from {path}")

    def _train_cloud(self, schedule, train_data, verbose, show_progress, callback_fn):
        """Round 0: RecBole's own fit with early stopping on valid; the best epoch's weights are kept."""
        start = time()
        self.model.view = "cloud"
        best_state = {}

        def keep_best(epoch_idx, valid_score):
            if self.cur_step == 0:  # early_stopping just took this epoch as the new best
                best_state["state"] = copy.deepcopy(self.model.state_dict())
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        rows = schedule.cloud_rows()
        loader = train_data if len(rows) == len(train_data.dataset) else schedule.loader(rows)
        self._log(f"round 0: training the cloud model on {len(loader.dataset)} rows")
        super().fit(loader, self.valid_data, verbose=verbose, saved=False, show_progress=show_progress, callback_fn=keep_best)
        if best_state:
            self.model.load_state_dict(best_state["state"])
        self.phase_seconds["round 0 cloud"] = time() - start

    def _device_phase(self, round_idx, dataset, rows):
        start = time()
        settings = DeviceSettings(self.config)
        local = LocalData.from_rows(dataset, rows, settings.valid_size, self.device, share=user_share(self.config))
        start_metapatch = self.model.metapatch[local.users]
        result = personalise(self.model, local, start_metapatch, settings, self.config["seed"] + round_idx)
        users, metapatch = gather_user_rows(self.config, local.users, result.metapatch, len(self.model.metapatch))
        self.model.metapatch[users] = metapatch
        self.model.uploaded_metapatch[users] = metapatch
        adopted = sum_over_ranks(self.config, int(result.adopted.sum()))
        seconds = time() - start
        self.phase_seconds[f"round {round_idx} device"] = seconds
        self._log(
            f"round {round_idx} device phase [time: {seconds:.2f}s, devices: {len(users)}, rows: {len(rows)}, "
            f"adopted their patch: {int(adopted)}]"
        )

    def _momodistill(self, round_idx, loader, teachers):
        start = time()
        optimizer = self._build_optimizer(params=self.model.backbone.parameters())
        weight = self.config["distill_weight"] if self.config["cloud_method"] == "momodistill" else 0
        for epoch in range(self.config["cloud_epochs"]):
            loss = distill_cloud_epoch(self.model, loader, optimizer, teachers, weight, self.config)
            self._log(f"round {round_idx} momodistill epoch {epoch} [train loss: {loss:.4f}]")
        self.phase_seconds[f"round {round_idx} momodistill"] = time() - start

    def _learn_shared_parameters(self, round_idx, loader, teachers):
        start = time()
        params = list(self.model.patches.parameters()) + list(self.model.encoder.parameters())
        optimizer = self._build_optimizer(params=params, learning_rate=self.config["shared_learning_rate"])
        for epoch in range(self.config["shared_epochs"]):
            loss = shared_parameters_epoch(self.model, loader, optimizer, teachers, self.config)
            self._log(f"round {round_idx} shared parameters epoch {epoch} [train loss: {loss:.4f}]")
        with torch.no_grad():
            users = torch.arange(len(self.model.metapatch), device=self.device)
            self.model.metapatch.copy_(self.model.encode_metapatch(users))
        self.phase_seconds[f"round {round_idx} shared"] = time() - start

    # Evaluation and bookkeeping --------------------------------------------------------------------------------

    def _evaluate_view(self, data, view):
        """Overall, per-group and per-user metrics of ``view`` on ``data``."""
        self.model.view = view
        result = self.evaluate(data, load_best_model=False, show_progress=self.show_progress)
        return {key: float(value) for key, value in result.items()}, self.group_result, self.user_result

    def _score_view(self, view):
        scores = {}
        scores["valid"], scores["valid_groups"], _ = self._evaluate_view(self.valid_data, view)
        if self.test_data is not None:
            scores["test"], scores["test_groups"], scores["test_users"] = self._evaluate_view(self.test_data, view)
        scores["score"] = scores["valid"][self.valid_metric]
        return scores

    def _record(self, round_idx, phase, best=None, changed=None):
        """Score the views a phase ``changed`` (default: both), log them, and keep the best of each view on valid;
        a view the phase left alone keeps its previous scores. Per-user test values are kept for the best only."""
        entry, scored = {"round": round_idx, "phase": phase}, {}
        best = best or {}
        for view in self.model.VIEWS:
            if changed is not None and view not in changed:
                entry[view] = self.history[-1][view]
                continue
            scores = scored["cloud"] if view == "device" and not self.has_devices else self._score_view(view)
            scored[view] = scores
            entry[view] = {key: value for key, value in scores.items() if key != "test_users"}
            if self.verbose:
                self.logger.info(
                    set_color(f"round {round_idx} {phase} {view} view valid", "blue") + ": " + dict2str(scores["valid"])
                )
            if view not in best or self._better(scores["score"], best[view]["score"]):
                best[view] = {"round": round_idx, "phase": phase, **scores}
                if view == "device":
                    best["device_state"] = copy.deepcopy(self.model.state_dict())
        if round_idx == 0:
            best["cloud_only"] = best["cloud"]
        self.history.append(entry)
        return best

    def _better(self, score, best_score):
        return score > best_score if self.valid_metric_bigger else score < best_score

    def _report(self, best):
        strip = lambda scores: {key: value for key, value in scores.items() if key != "score"}
        keys = [*dccl_defaults(), *self.CLOUD_KEYS, "user_groups"]
        return {
            "cloud_only": strip(best["cloud_only"]),
            "dccl_cloud": strip(best["cloud"]),
            "dccl_device": strip(best["device"]),
            "history": self.history,
            "user_groups": self.eval_collector.groups.members(),
            "config": {key: plain(self.config[key]) for key in keys},
            "phase_seconds": self.phase_seconds,
            **({"cold_start": self.cold_start} if self.cold_start else {}),
        }

    def _log(self, message):
        if self.verbose:
            self.logger.info(set_color(message, "green"))
