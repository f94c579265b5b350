"""MoMoDistill: the cloud learns from the device models of this round (paper eqs. 5-7).

Step 1 (model-over-models) updates W_f on the devices' data with
``CE(f(x), y) + distill_weight * tau^2 * KL(f_m(x) / tau || f(x) / tau)``; ``distill_weight = 0`` is plain
incremental training, the model-over-data baseline. Step 2 then keeps the new W_f fixed and learns Theta and the
auxiliary encoder g so that the proxy device model (new W_f, patch from ``g(user)``) matches the device model.
The teachers are the model as the device phase left it, frozen: its state is copied once and run through
``torch.func.functional_call``. Below the lowest patch site neither the teachers nor step 2's backbone change, so
both run from the round's cached site outputs (:class:`RowCache`): the teachers from those the device phase
computed (or, in a run resumed after the device phase, from the same computation redone by the teachers' first
batch), step 2 from its own, computed at its first batch. In a distributed run each rank takes its share of every
batch and DDP averages the gradients of what the step trains (W_f in step 1, Theta and g in step 2).
"""

import math

import torch
from torch.func import functional_call

from recbole_dccl.distributed import advance_epoch, data_parallel
from recbole_dccl.errors import NonFiniteLoss
from recbole_dccl.model.frozen import frozen
from recbole_dccl.trainer.progress import progress
from recbole_dccl.trainer.site_cache import cached_forward


class DeviceTeachers:
    """The round's device models (backbone, Theta and uploaded metapatches as they are now, or as ``state``
    holds them when a run resumes), frozen; ``cache``: the lowest site's outputs of the round's rows under this
    backbone (a :class:`RowCache`, filled by the device phase or at the teachers' first batch); ``teaching``:
    which users' devices teach (``[n_users]`` bool; ``None``: all), the others' rows get no distillation term."""

    def __init__(self, model, state=None, cache=None, teaching=None):
        self.model, self.cache = model, cache
        self.teaching = None if teaching is None else teaching.to(model.metapatch.device)
        state = model.state_dict() if state is None else state
        self.state = {name: value.detach().clone() for name, value in state.items()}

    @torch.no_grad()
    def logits(self, interaction):
        metapatch = self.state["uploaded_metapatch"][interaction[self.model.USER_ID]]
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            forward = lambda: functional_call(self.model, self.state, (interaction, metapatch))
            return cached_forward(self.model, self.cache, interaction, forward, self.state)
        finally:  # each module's own mode: step 2 keeps the backbone in eval mode inside a training model
            for module, training in modes:
                module.training = training


    def mean(self, values, interaction):
        """The mean of the per-row distillation ``values`` over the rows whose device teaches."""
        if self.teaching is None:
            return values.mean()
        teaches = self.teaching[interaction[self.model.USER_ID]].to(values.dtype)
        return (values * teaches).sum() / teaches.sum().clamp(min=1)


def _run_epoch(model, loader, optimizer, loss_fn, config, description):
    total, device, clip_grad_norm = 0.0, config["device"], config["clip_grad_norm"]
    advance_epoch(loader)
    for interaction in progress(loader, description, config["show_progress"], total=len(loader)):
        interaction = interaction.to(device)
        loss = loss_fn(interaction)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the {description} training loss is {value}")
        optimizer.zero_grad()
        loss.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], **clip_grad_norm)
        optimizer.step()
        total += value
    return total


def distill_cloud_epoch(model, loader, optimizer, teachers, weight, config):
    """One epoch of step 1 on the backbone (W_f) with distillation ``weight``; returns the summed loss."""
    temperature = config["distill_temperature"]
    objective = model.objective

    def loss_fn(interaction):
        logits = cloud(interaction)
        loss = objective.loss(logits, interaction).mean()
        if weight:
            loss = loss + weight * teachers.mean(objective.distill(logits, teachers.logits(interaction), temperature), interaction)
        return loss

    model.train()
    with frozen(model.patches), frozen(model.encoder):  # not in step 1's graph; DDP syncs W_f alone
        cloud = data_parallel(model, config)
        return _run_epoch(model, loader, optimizer, loss_fn, config, "MoMoDistill")


def shared_parameters_epoch(model, loader, optimizer, teachers, config, cache=None):
    """One epoch of step 2 on Theta and the encoder, W_f fixed; returns the summed loss. ``cache``: a
    :class:`RowCache` of the loader's rows under the current (fixed) W_f, kept from epoch to epoch."""
    temperature, ce_weight = config["distill_temperature"], config["shared_ce_weight"]
    objective = model.objective

    def loss_fn(interaction):
        metapatch = model.encode_metapatch(interaction[model.USER_ID])
        logits = cached_forward(model, cache, interaction, lambda: proxy(interaction, metapatch))
        loss = teachers.mean(objective.distill(logits, teachers.logits(interaction), temperature), interaction)
        if ce_weight:
            loss = loss + ce_weight * objective.loss(logits, interaction).mean()
        return loss

    with frozen(model.backbone):
        proxy = data_parallel(model, config)
        return _run_epoch(model, loader, optimizer, loss_fn, config, "Shared")
