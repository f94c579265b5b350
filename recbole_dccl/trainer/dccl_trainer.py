"""DCCLTrainer: round 0 trains the cloud model as RecBole would; each later round runs the device phase,
MoMoDistill step 1 and step 2, evaluating the cloud and device views after every phase."""

import copy
import os
from time import time

import torch
from recbole.trainer import Trainer
from recbole.utils import ModelType, dict2str, init_seed, set_color

from recbole_dccl.defaults import dccl_defaults
from recbole_dccl.rounds import RoundSchedule
from recbole_dccl.distributed import (
    DistributedTrainerMixin, gather_user_rows, is_main_process, sum_over_ranks, user_share,
)
from recbole_dccl.errors import NonFiniteLoss
from recbole_dccl.evaluation import UserGroupEvaluationMixin
from recbole_dccl.files import load_safe, save_atomic
from recbole_dccl.fleet import FleetSettings, PrivacyAccount, RoundFleet
from recbole_dccl.model.memory import FEATURES
from recbole_dccl.trainer.checkpoint import SafeCheckpointMixin, check_identity, plain, reading_files
from recbole_dccl.trainer.cold_start import COLD_GROUP, cold_start_report, cold_start_table
from recbole_dccl.trainer.device_phase import LocalData, device_settings, personalise
from recbole_dccl.trainer.memory_fit import fit_memory
from recbole_dccl.trainer.momodistill import DeviceTeachers, distill_cloud_epoch, shared_parameters_epoch
from recbole_dccl.trainer.phase_log import publish_phase
from recbole_dccl.trainer.resume import FitProgress, ResumedRun, run_state_file, save_run_state
from recbole_dccl.trainer.run_state import RoundState, RunRecord
from recbole_dccl.trainer.site_cache import RowCache


class DCCLTrainer(DistributedTrainerMixin, UserGroupEvaluationMixin, SafeCheckpointMixin, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.optimizer = self._build_optimizer(params=self.model.backbone.parameters())
        # device_method none: no device phase and no step 2; the device view is the cloud view.
        self.has_devices = config["device_method"] != "none"
        self.fleet_settings = FleetSettings.from_config(config)
        self.availability = None  # set at each round's start from the RoundSchedule
        self.record = RunRecord()
        self.round = None  # the RoundState of the round being run
        self.phase_values = {}  # what the phase being run measured, for phase_log
        self.resumed = self.resumed_round_0 = self.run_state_file = None
        self.report = None
        self.cold_start = None
        self.saved_files = {}  # reading -> round, phase and path of the model file written
        self.verbose, self.show_progress = True, False

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None,
            test_data=None):
        """Run round 0 and the DCCL rounds. Returns RecBole's ``(best_valid_score, best_valid_result)`` of the
        device view; :attr:`report` holds cloud-only, DCCL cloud and DCCL device results and the history. With
        ``test_data``, every phase is also scored on test (selection still uses valid only). After every phase the
        run state is saved (with ``saved``); with ``resume`` set, the phases its file has done are skipped."""
        self.verbose, self.show_progress = verbose, show_progress
        self.valid_data, self.test_data = valid_data, test_data
        schedule = RoundSchedule(self.config, train_data)
        self.model.hold_histories([data.dataset for data in (train_data, valid_data, test_data) if data is not None])
        self._collect_user_groups(schedule, train_data)
        self._start_run_state(saved)

        self._phase(0, "cloud", lambda: self._pretrain_cloud(schedule, train_data, verbose, show_progress, callback_fn))
        for round_idx in range(1, self.config["rounds"] + 1):
            self.start_round(schedule, round_idx)
            if self.has_devices:
                local_rows = schedule.local_rows(round_idx)
                train_devices = lambda: self.device_phase(round_idx, schedule.training_rows(local_rows, round_idx))
                self._phase(round_idx, "device", train_devices, changed=("device",))
            self._phase(round_idx, "momodistill", lambda: self.momodistill(round_idx))
            if self.has_devices:
                self._phase(round_idx, "shared", lambda: self.learn_shared_parameters(round_idx), changed=("device",))
        if self.resumed is not None:  # the file's run had done every phase: it ended with the file's model
            self.model.load_state_dict(self.resumed.state["model"])
            self.resumed = None
        deployed_state = copy.deepcopy(self.model.state_dict())
        if len(schedule.cold_users) and self.has_devices:
            self.cold_start = cold_start_report(self, schedule, self.config["seed"] + self.config["rounds"] + 1)
            self._log(cold_start_table(self.cold_start, self.valid_metric))

        best = self.record.best
        self.model.load_state_dict(best["device_state"])
        self.model.view = "device"
        self.best_valid_score = best["device"]["score"]
        self.best_valid_result = best["device"]["valid"]
        if saved:
            self._save_readings(best, deployed_state)
        self.report = self._report(best)
        return self.best_valid_score, self.best_valid_result

    def _save_readings(self, best, deployed_state):
        """Write the run's two models (:data:`~recbole_dccl.trainer.checkpoint.READINGS`) from the main process:
        ``selected``, the model loaded now (the device view's best phase on valid), at RecBole's
        ``saved_model_file``, which RecBole's ``evaluate(load_best_model=True)`` reads; and ``deployed``, the
        ``deployed_state`` after the last phase, beside it. :attr:`saved_files` lists them for the end of the log."""
        if not is_main_process(self.config):  # RecBole's rule (local rank 0) would write once per machine
            return
        files = reading_files(self.saved_model_file)
        names = {reading: os.path.basename(path) for reading, path in files.items()}
        models = {"selected": (best["device"], self.model.state_dict()),
                  "deployed": (best["deployed_device"], deployed_state)}
        for reading, (phase, state) in models.items():
            checkpoint = {
                **self._checkpoint(phase["round"]), "state_dict": state, "best_valid_score": float(phase["score"]),
                "reading": reading, "round": phase["round"], "phase": phase["phase"], "reading_files": names,
            }
            save_atomic(checkpoint, files[reading])
            self.saved_files[reading] = {"round": phase["round"], "phase": phase["phase"], "path": files[reading]}

    def start_round(self, schedule, round_idx):
        """Set up round ``round_idx``: the random streams, the users' visible history for the encoder, and the loader
        and row cache of the rows the devices hold (which the cloud then takes in); returns those rows
        (:class:`TrainingRows`). The streams start from the seed and the round alone, so a run that loaded its
        round-0 model (``cloud_checkpoint``) goes on exactly as the run that trained it (dropout in step 1 draws
        from them)."""
        init_seed(self.config["seed"] + self.config["local_rank"] + round_idx, self.config["reproducibility"])
        rows = schedule.training_rows(schedule.device_rows(round_idx), round_idx)
        self.model.user_history = schedule.user_history(round_idx, *self.model.user_history.shape).to(self.device)
        self.availability = schedule.online  # who is online in which round (device_availability), or None
        self.round = RoundState(rows.loader(self.config), None, self._round_fleet(round_idx))
        self.round.cache = self.row_cache()
        return rows

    def _collect_user_groups(self, schedule, train_data):
        """User groups by all training interactions, plus the cold-start users as a group of their own."""
        self.eval_collector.data_collect(train_data)
        if len(schedule.cold_users):
            self.eval_collector.groups.add(COLD_GROUP, schedule.cold_users)

    def _start_run_state(self, saved):
        """Where the run state goes after each phase (the resumed file, if any), and what a resumed run has done."""
        self.resumed = None
        if self.config["resume"]:
            self.resumed = ResumedRun(self.config["resume"], self._settings())
            self.record = self.resumed.record()
            state = self.resumed.state
            done = (f"round 0 epoch {state['round_0']['epoch']}" if self.resumed.round_0
                    else f"round {state['round']} {state['phase']}")
            self._log(f"resuming from {self.resumed.path}: done up to {done}")
        self.run_state_file = None
        if saved:
            self.run_state_file = self.resumed.path if self.resumed else run_state_file(self.saved_model_file)

    def _phase(self, round_idx, phase, run, changed=None):
        """Run ``phase`` of round ``round_idx``, score the views it ``changed`` and save the run state; a phase the
        resumed run has done is skipped, and the first one it has not runs on the restored state."""
        if self.resumed is not None:
            if self.resumed.done(round_idx, phase):
                return
            if self.resumed.round_0:  # round 0 restores itself once its loader is built
                self.resumed_round_0 = self.resumed
            else:
                self.resumed.restore_training(self, round_idx)
            self.resumed = None
        try:
            run()
        except NonFiniteLoss as error:
            kept = self.run_state_file and os.path.isfile(self.run_state_file)
            raise NonFiniteLoss(
                f"round {round_idx} {phase}: {error}; training stopped, "
                + (f"the run state after the last completed phase (or epoch of round 0) is kept in "
                   f"[{self.run_state_file}]" if kept else "no run state was written before it")
            ) from None
        self._record(round_idx, phase, changed)
        self._publish(round_idx, phase)
        if self.run_state_file:
            save_run_state(self.run_state_file, self, round_idx, phase, self._settings())

    # Phases ---------------------------------------------------------------------------------------------------

    # What round 0's data and model depend on: a shared cloud checkpoint must agree on all of it.
    CLOUD_KEYS = (
        "dataset", "backbone", "protocol", "fresh_interactions", "rounds", "cold_start_ratio", "seed", "MAX_ITEM_LIST_LENGTH",
        "learner", "learning_rate", "weight_decay", "epochs", "train_batch_size", "stopping_step", "valid_metric",
        "embedding_size", "hidden_size", "mlp_hidden_size", "threshold", "train_neg_sample_args",
    )

    @classmethod
    def cloud_identity(cls, config):
        """``config``'s values of :attr:`CLOUD_KEYS`, as plain values. RecBole builds item histories for sequential
        models only, so a CTR backbone's round 0 does not depend on ``MAX_ITEM_LIST_LENGTH``."""
        reads_history = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        return {key: plain(config[key]) for key in cls.CLOUD_KEYS if reads_history or key != "MAX_ITEM_LIST_LENGTH"}

    def _pretrain_cloud(self, schedule, train_data, verbose, show_progress, callback_fn):
        """Round 0, or its result loaded from ``cloud_checkpoint``."""
        path = self.config["cloud_checkpoint"]
        if path and os.path.isfile(path):
            self.load_cloud(path)
            return
        self._train_cloud(schedule, train_data, verbose, show_progress, callback_fn)
        if path and is_main_process(self.config):
            state = {key: value for key, value in self.model.state_dict().items() if key.startswith("backbone.")}
            identity = self.cloud_identity(self.config)
            save_atomic({"identity": identity, "state_dict": state}, path)
            self._log(f"round 0 cloud model written to {path}")

    def load_cloud(self, path):
        checkpoint = load_safe(path, "cloud_checkpoint")
        identity = self.cloud_identity(self.config)
        check_identity("cloud_checkpoint", path, checkpoint["identity"], identity)
        self.model.load_state_dict(checkpoint["state_dict"], strict=False)
        self._log(f"round 0: cloud model loaded from {path}")

    def _train_cloud(self, schedule, train_data, verbose, show_progress, callback_fn):
        """Round 0: RecBole's own fit with early stopping on valid; the best epoch's weights are kept. The run state
        is saved after every evaluated epoch, so a run cut inside round 0 resumes from its last epoch."""
        self.model.view = "cloud"
        rows = schedule.cloud_rows()
        loader = train_data if len(rows) == len(train_data.dataset) else schedule.loader(rows)
        progress = FitProgress()
        if self.resumed_round_0 is not None:
            progress, self.resumed_round_0 = self.resumed_round_0.restore_fit(self, loader), None
            self._log(f"round 0: resuming after epoch {progress.epoch}")
        start = time() - progress.seconds  # a resumed round 0 counts the seconds it had spent

        def end_of_epoch(epoch_idx, valid_score):
            progress.record(self, loader, epoch_idx, time() - start)
            if self.run_state_file:
                save_run_state(self.run_state_file, self, 0, "cloud", self._settings(), round_0=progress)
            if callback_fn:
                callback_fn(epoch_idx, valid_score)

        self._log(f"round 0: training the cloud model on {len(loader.dataset)} rows")
        super().fit(loader, self.valid_data, verbose=verbose, saved=False, show_progress=show_progress,
                    callback_fn=end_of_epoch)
        self._collect_user_groups(schedule, train_data)  # RecBole's fit collected round 0's rows only
        if progress.best_weights is not None:
            self.model.load_state_dict(progress.best_weights)
        self.record.phase_seconds["round 0 cloud"] = time() - start

    def device_phase(self, round_idx, rows):
        """Round ``round_idx``'s devices train on ``rows`` (:class:`TrainingRows`)."""
        start = time()
        settings = device_settings(self.config)
        memory_values = {}
        if self.model.memory is not None:
            fitted = fit_memory(self.model, self.round.loader.dataset, self.config["valid_metric"],
                                settings.chunk_size, self.device, gated=self.config["memory_gate"])
            memory_values = {f"memory/{name}": value for name, value in zip((*FEATURES, "gate"), fitted.tolist())}
            self._log(f"round {round_idx} personal memory chosen on the round's {len(self.round.loader.dataset)} rows: "
                      f"{', '.join(f'{name} {value:.3f}' for name, value in memory_values.items())}")
        local = LocalData.from_rows(rows, settings.valid_size, self.device, share=user_share(self.config))
        fleet = self.round.fleet
        if not fleet.whole:  # the devices sampled this round train; the others keep their metapatch
            local, _ = local.subset(torch.nonzero(fleet.sampled.to(self.device)[local.users]).squeeze(1))
        start_metapatch = self.model.metapatch[local.users]
        # The outputs it computes are kept for MoMoDistill's teachers when the devices hold just the round's rows
        # (the rows they hold always include those: only their number tells the two apart).
        cache = self.round.cache
        keep = cache if cache is not None and len(cache.data) == len(rows) else None
        result = personalise(self.model, local, start_metapatch, settings, self.config["seed"] + round_idx, keep=keep)
        users, metapatch = gather_user_rows(self.config, local.users, result.metapatch, len(self.model.metapatch))
        uploaded = fleet.uploaded.to(self.device)[users]
        started = self.model.metapatch[users]
        received = fleet.receive(users[uploaded], metapatch[uploaded], started[uploaded])
        change = (metapatch - started).norm(dim=1).median() if len(users) else torch.tensor(float("nan"))
        self.model.metapatch[users] = metapatch
        self.model.uploaded_metapatch[users[uploaded]] = received
        adopted = sum_over_ranks(self.config, int(result.adopted.sum()))
        trained = result.train_loss.isfinite()
        n_trained = sum_over_ranks(self.config, int(trained.sum()))
        loss = sum_over_ranks(self.config, float(result.train_loss[trained].sum())) / n_trained if n_trained else float("nan")
        self.phase_values = {"loss/device": loss, "adopted_share": adopted / max(len(users), 1), **memory_values,
                             "metapatch_change_median": float(change), **self._fleet_values(round_idx)}
        seconds = time() - start
        self.record.phase_seconds[f"round {round_idx} device"] = seconds
        self._log(
            f"round {round_idx} device phase [time: {seconds:.2f}s, devices: {len(users)}, rows: {len(rows)}, "
            f"adopted their patch: {int(adopted)}, uploads received: {int(uploaded.sum())}, median L2 change of a "
            f"metapatch: {float(change):.4f}]"
        )

    def momodistill(self, round_idx):
        start = time()
        loader = self.round.loader
        self.round.teachers = DeviceTeachers(self.model, cache=self.round.cache, teaching=self.round.fleet.teaching)
        optimizer = self._build_optimizer(params=self.model.backbone.parameters())
        weight = self.config["distill_weight"] if self.config["cloud_method"] == "momodistill" else 0
        for epoch in range(self.config["cloud_epochs"]):
            loss = distill_cloud_epoch(self.model, loader, optimizer, self.round.teachers, weight, self.config)
            self._log(f"round {round_idx} momodistill epoch {epoch} [train loss: {loss:.4f}]")
            self.phase_values["loss/momodistill"] = loss / len(loader)
        self.record.phase_seconds[f"round {round_idx} momodistill"] = time() - start

    def learn_shared_parameters(self, round_idx):
        start = time()
        params = list(self.model.patches.parameters()) + list(self.model.encoder.parameters())
        optimizer = self._build_optimizer(params=params, learning_rate=self.config["shared_learning_rate"])
        cache = self.row_cache()  # of the new W_f, which step 2 keeps fixed
        for epoch in range(self.config["shared_epochs"]):
            loss = shared_parameters_epoch(self.model, self.round.loader, optimizer, self.round.teachers, self.config, cache)
            self._log(f"round {round_idx} shared parameters epoch {epoch} [train loss: {loss:.4f}]")
            self.phase_values["loss/shared"] = loss / len(self.round.loader)
        with torch.no_grad():
            users = torch.arange(len(self.model.metapatch), device=self.device)
            if not self.round.fleet.whole:  # only the devices sampled this round receive their new metapatch
                users = users[self.round.fleet.sampled.to(self.device)]
            self.model.metapatch[users] = self.model.encode_metapatch(users)
        self.record.phase_seconds[f"round {round_idx} shared"] = time() - start

    def row_cache(self):
        """A :class:`RowCache` of the round's rows."""
        settings = device_settings(self.config)
        return RowCache(self.round.loader.dataset, self.device, settings.cache_bytes, settings.chunk_size)

    # Evaluation and bookkeeping --------------------------------------------------------------------------------

    def _evaluate_view(self, data, view):
        """Overall, per-group, per-target-type and per-user metrics of ``view`` on ``data``."""
        self.model.view = view
        result = self.evaluate(data, load_best_model=False, show_progress=self.show_progress)
        overall = {key: float(value) for key, value in result.items()}
        return overall, self.group_result, self.type_result, self.user_result

    def score_view(self, view):
        scores = {}
        scores["valid"], scores["valid_groups"], scores["valid_types"], _ = self._evaluate_view(self.valid_data, view)
        if self.test_data is not None:
            test = self._evaluate_view(self.test_data, view)
            scores["test"], scores["test_groups"], scores["test_types"], scores["test_users"] = test
        scores["score"] = scores["valid"][self.valid_metric]
        return scores

    def _device_view_is_cloud(self):
        """While every metapatch is zero (round 0; a round no device adopted its patch in; always with
        ``device_method: none``) and the personal memory, if any, has zero weights, the device view computes exactly
        the cloud model: a zero metapatch adds a zero patch (metapatch.py), zero weights a zero memory (memory.py)."""
        memory = self.model.memory
        return not self.model.metapatch.any() and (memory is None or not memory.weights.any())

    @staticmethod
    def _cloud_scores(scored, best):
        """The cloud view's latest scores: this phase's, or those it was left with."""
        if "cloud" in scored:
            return scored["cloud"]
        return {key: value for key, value in best["deployed_cloud"].items() if key not in ("round", "phase")}

    def _record(self, round_idx, phase, changed=None):
        """Score the views a phase ``changed`` (default: both), log them, and keep the best of each view on valid;
        a view the phase left alone keeps its previous scores. Per-user test values are kept for the best and for
        the latest scores of each view (``deployed_<view>``: what the cloud and the devices run from now on)."""
        entry, scored = {"round": round_idx, "phase": phase}, {}
        history, best = self.record.history, self.record.best
        for view in self.model.VIEWS:
            if changed is not None and view not in changed:
                entry[view] = history[-1][view]
                continue
            if view == "device" and self._device_view_is_cloud():
                scores = self._cloud_scores(scored, best)
            else:
                scores = self.score_view(view)
            scored[view] = scores
            entry[view] = {key: value for key, value in scores.items() if key != "test_users"}
            if self.verbose:
                self.logger.info(
                    set_color(f"round {round_idx} {phase} {view} view valid", "blue") + ": " + dict2str(scores["valid"])
                )
            best[f"deployed_{view}"] = {"round": round_idx, "phase": phase, **scores}
            if view not in best or self._better(scores["score"], best[view]["score"]):
                best[view] = best[f"deployed_{view}"]
                if view == "device":
                    best["device_state"] = copy.deepcopy(self.model.state_dict())
        if round_idx == 0:
            best["cloud_only"] = best["cloud"]
        history.append(entry)

    def _publish(self, round_idx, phase):
        """The phase's scalars on TensorBoard and Weights & Biases (:mod:`phase_log`), from the main process."""
        if is_main_process(self.config):
            history, seconds = self.record.history, self.record.phase_seconds.get(f"round {round_idx} {phase}")
            publish_phase(self.tensorboard, self.wandblogger, len(history) - 1, history[-1], self.phase_values, seconds)
        self.phase_values = {}

    def _better(self, score, best_score):
        return score > best_score if self.valid_metric_bigger else score < best_score

    def _settings(self):
        """The settings a run is reported with and a resumed run must agree on, as plain values."""
        keys = [*dccl_defaults(), *self.CLOUD_KEYS, "user_groups"]
        return {key: plain(self.config[key]) for key in keys}

    def _report(self, best):
        strip = lambda scores: {key: value for key, value in scores.items() if key != "score"}
        selection = {view: self._selection(view, best[view]) for view in self.model.VIEWS}
        for view in self.model.VIEWS:
            self._log(selection[view]["message"])
        return {
            "cloud_only": strip(best["cloud_only"]),
            "dccl_cloud": strip(best["cloud"]),
            "dccl_device": strip(best["device"]),
            "deployed_cloud": strip(best["deployed_cloud"]),
            "deployed_device": strip(best["deployed_device"]),
            "selection": selection,
            "history": self.record.history,
            "user_groups": self.eval_collector.groups.members(),
            "config": self._settings(),
            "phase_seconds": self.record.phase_seconds,
            "saved_files": self.saved_files,
            **({"fleet": self._fleet_report()} if self.has_devices else {}),
            **({"cold_start": self.cold_start} if self.cold_start else {}),
        }

    def _fleet_report(self):
        """Per round: :meth:`_fleet_summary`."""
        return [self._fleet_summary(self._round_fleet(round_idx)) for round_idx in range(1, self.config["rounds"] + 1)]

    def _round_fleet(self, round_idx):
        online = None if self.availability is None else self.availability[round_idx]
        return RoundFleet(self.fleet_settings, len(self.model.metapatch), self.config["seed"], round_idx, online)

    def _fleet_summary(self, fleet):
        """A round's devices sampled, uploads received and bytes sent, and with DP noise the epsilon after it."""
        settings = self.fleet_settings
        summary = fleet.summary(self.model.metapatch.shape[1])
        if settings.dp_noise_multiplier:
            summary.update(epsilon=PrivacyAccount(settings).epsilon(fleet.round_idx), delta=settings.dp_delta)
        return summary

    def _fleet_values(self, round_idx):
        """The round's fleet for the log line of the device phase and TensorBoard."""
        summary = self._fleet_summary(self.round.fleet)
        if not self.round.fleet.whole or self.fleet_settings.dp_clip is not None:
            self._log(f"round {round_idx} fleet: " + ", ".join(f"{key} {value}" for key, value in summary.items()
                                                               if key != "round"))
        return {f"fleet/{key}": value for key, value in summary.items() if key != "round"}

    def _selection(self, view, chosen):
        """Which phase ``view`` reports (the best on valid), and in words why: when round 0 won, the best DCCL
        phase and how far below round 0 it scored."""
        metric = self.valid_metric
        scored = [entry for entry in self.record.history if entry["round"] > 0]
        picked = {"round": chosen["round"], "phase": chosen["phase"], "valid": chosen["score"]}
        where = f"round {chosen['round']} {chosen['phase']}"
        if not scored:
            return {**picked, "message": f"{view} view: {where} (no DCCL round ran)"}
        runner_up = scored[0]
        for entry in scored[1:]:
            if self._better(entry[view]["valid"][metric], runner_up[view]["valid"][metric]):
                runner_up = entry
        other = runner_up[view]["valid"][metric]
        if chosen["round"] > 0:
            message = f"{view} view: {where} selected on valid {metric} {chosen['score']:.4f}"
        else:
            change = other / chosen["score"] - 1 if chosen["score"] else float("nan")
            message = (
                f"{view} view: selection kept round 0 (valid {metric} {chosen['score']:.4f}): no DCCL phase beat it; "
                f"the best, round {runner_up['round']} {runner_up['phase']}, scored {other:.4f} ({100 * change:+.1f}%)"
            )
        best_dccl = {"round": runner_up["round"], "phase": runner_up["phase"], "valid": other}
        return {**picked, "best_dccl_phase": best_dccl, "message": message}

    def _check_nan(self, loss):
        """RecBole's round-0 check, for inf as well as nan."""
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the cloud model's training loss is {loss.item()}")

    def _log(self, message):
        if self.verbose:
            self.logger.info(set_color(message, "green"))
