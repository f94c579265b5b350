"""The device phase: every device trains its own metapatch on its own local data (paper eq. 3), all at once.

Per device m: minimise the mean data loss of its local minibatches (plus ``device_l2 * |p - p_start|^2``) with
Adam on ``metapatch_m`` alone; W_f, Theta and the encoder stay frozen, the backbone runs in eval mode. Each
device holds out its ``device_valid_size`` newest local rows and keeps the cloud model (zero metapatch) unless a
patch wins on them: with ``device_select: best`` the best of {starting metapatch, each epoch's metapatch}, with
``last`` only the final one (a single comparison, so a win is less often chance).

:func:`personalise` does this for all devices together: each step takes every device's next local minibatch,
sums the per-device mean losses (device m's metapatch only touches its own rows, so the gradient of the sum is
each device's own gradient) and applies Adam with per-device moments and step counts. :func:`personalise_one_by_one`
is the plain reference: one device at a time, one ``torch.optim.Adam`` each, the same minibatches. Tests and
benchmarks check that the two agree.

In a distributed run each rank holds a share of the devices (``LocalData.from_rows(share=...)``); random orders are
drawn for all of the round's rows, so every device trains exactly as it does in one process.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from recbole.data.interaction import Interaction

from dccl_device.settings import DeviceSettings
from recbole_dccl.errors import NonFiniteLoss
from recbole_dccl.model.frozen import frozen
from recbole_dccl.negatives import rows_per_positive
from recbole_dccl.trainer.progress import progress
from recbole_dccl.trainer.site_cache import SiteCache, replaying


def take(interaction, rows):
    """The ``rows`` (a tensor) of ``interaction``; RecBole's ``interaction[rows]`` turns them into a Python list."""
    return Interaction({field: values[rows] for field, values in interaction.interaction.items()})


@dataclass
class LocalData:
    """The rows the devices hold this round, with the device (index into ``users``) that owns each row;
    ``cached``: the lowest patch site's output for every row, when the device phase runs from it."""

    interaction: object
    users: torch.Tensor
    owner: torch.Tensor
    is_valid: torch.Tensor
    key_index: torch.Tensor  # each row's place among all the round's rows (on all ranks)
    n_keys: int  # the round's rows on all ranks
    cached: dict = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows, valid_size, device, share=(0, 1)):
        """The devices of ``rows`` (:class:`~recbole_dccl.rounds.TrainingRows`), each holding out its ``valid_size``
        newest positives with their negatives; with ``share=(index, parts)`` only the users at positions
        ``index, index + parts, ...`` of the round's users, the ones a rank of ``parts`` holds."""
        dataset = rows.dataset
        user_ids = dataset.inter_feat[dataset.uid_field].numpy()
        is_valid = rows.newest(valid_size)
        index, parts = share
        mine = np.isin(user_ids, np.unique(user_ids)[index::parts])
        interaction = dataset[torch.as_tensor(np.flatnonzero(mine))].to(device)
        users, owner = torch.unique(interaction[dataset.uid_field], return_inverse=True)
        as_tensor = lambda array: torch.from_numpy(array).to(device)
        return cls(interaction, users, owner, as_tensor(is_valid[mine]), as_tensor(np.flatnonzero(mine)), len(user_ids))

    def shuffle_keys(self, epochs, seed):
        """``[epochs, rows]`` random keys of these rows, drawn for all the round's rows: a device's order does not
        depend on which rank holds it."""
        return shuffle_keys(self.n_keys, epochs, seed)[:, self.key_index.cpu()].to(self.owner.device)

    def subset(self, devices):
        """The local data of ``devices`` (indices into ``users``), renumbered in that order, and its rows here."""
        renumber = torch.full((len(self.users),), -1, dtype=torch.long, device=self.owner.device)
        renumber[devices] = torch.arange(len(devices), device=self.owner.device)
        rows = torch.nonzero(renumber[self.owner] >= 0).squeeze(1)
        part = LocalData(
            take(self.interaction, rows), self.users[devices], renumber[self.owner[rows]], self.is_valid[rows],
            self.key_index[rows], self.n_keys,
        )
        return part, rows


@dataclass
class DeviceResult:
    metapatch: torch.Tensor  # [devices, k]: what each device keeps (zero: the cloud model)
    adopted: torch.Tensor  # [devices] bool: the patch beat the cloud model on local validation
    valid_loss_cloud: torch.Tensor  # [devices] local validation loss of the cloud model (nan: no validation)
    valid_loss_device: torch.Tensor  # [devices] ... of what the device keeps
    train_loss: torch.Tensor  # [devices] mean loss on the device's training rows in its last local epoch (nan: none)

    @classmethod
    def unguarded(cls, metapatch, train_loss):
        """Without local validation every device keeps what it trained."""
        nan = torch.full((len(metapatch),), float("nan"), device=metapatch.device)
        return cls(metapatch, (metapatch != 0).any(dim=1), nan, nan, train_loss)

    @classmethod
    def gather(cls, shape, parts, device):
        """One result for all devices from ``(devices, DeviceResult of those devices)`` parts."""
        nan = torch.full(shape[:1], float("nan"), device=device)
        whole = cls(torch.zeros(shape, device=device), torch.zeros(shape[:1], dtype=torch.bool, device=device), nan,
                    nan.clone(), nan.clone())
        for devices, part in parts:
            for name in ("metapatch", "adopted", "valid_loss_cloud", "valid_loss_device", "train_loss"):
                getattr(whole, name)[devices] = getattr(part, name)
        return whole


def row_losses(model, local, rows, metapatch):
    """Per-row data loss of ``rows`` under their devices' rows of ``metapatch`` (``[devices, k]``)."""
    interaction = take(local.interaction, rows)
    with replaying(model, {site: outputs[rows] for site, outputs in local.cached.items()}):
        logits = model(interaction, gather_rows(metapatch, local.owner[rows]))
    return model.objective.loss(logits, interaction)


def gather_rows(table, index):
    """``table[index]`` by ``index_select``, whose gradient adds the rows of each ``table`` row in ``index`` order
    on any number of threads. The gradient of ``table[index]`` (``index_put_`` with accumulate) adds them with
    atomic adds on several threads once it has 32,768 elements (ml-100k's first device step: 3,772 rows of 16), in
    an order set by thread timing, i.e. by the machine's load; a step's rows come grouped by device, so only a device
    whose rows straddled two threads' shares was exposed."""
    return table.index_select(0, index)


def chunks(rows, size):
    return (rows[start : start + size] for start in range(0, len(rows), size))


def shuffle_keys(rows, epochs, seed):
    """``[epochs, rows]`` random keys: each epoch visits a device's training rows in the order of their keys."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.rand(rows, generator=generator) for _ in range(epochs)]) if epochs else torch.empty(0, rows)


@torch.no_grad()
def valid_losses(model, local, metapatch, chunk_size):
    """Each device's mean loss on its held-out rows (nan for devices without any)."""
    rows = torch.nonzero(local.is_valid).squeeze(1)
    total = torch.zeros(len(local.users), device=metapatch.device)
    for chunk in chunks(rows, chunk_size):
        total.index_add_(0, local.owner[chunk], row_losses(model, local, chunk, metapatch))
    count = torch.bincount(local.owner[rows], minlength=len(local.users))
    return total / count  # 0/0 = nan where a device holds nothing out


def epoch_steps(local, train_rows, keys, batch_size):
    """The training rows of each step of one epoch: every device's rows in the order of their ``keys``, cut into
    minibatches; step s holds minibatch s of every device that has one. Returns the rows ordered by step and
    each step's ``(start, end)`` in them."""
    order = torch.argsort(keys)
    order = order[torch.argsort(local.owner[train_rows][order], stable=True)]
    rows = train_rows[order]
    owners = local.owner[rows]
    first = torch.searchsorted(owners, torch.arange(len(local.users), device=rows.device))
    step = (torch.arange(len(rows), device=rows.device) - first[owners]) // batch_size
    rows = rows[torch.argsort(step, stable=True)]
    ends = torch.cumsum(torch.bincount(step), 0).tolist() if len(rows) else []
    return rows, list(zip([0] + ends[:-1], ends))


class PerDeviceAdam:
    """``torch.optim.Adam``'s update with one state (moments, step count) per device (row of the parameter).
    Devices are numbered by decreasing number of training rows, so the devices of a step are always the first
    ``active`` rows and every update works on slices, not on gathered copies."""

    def __init__(self, param, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = torch.zeros(len(param), 1, dtype=torch.float64, device=param.device)

    @torch.no_grad()
    def step(self, param, grad, active):
        """Update the first ``active`` rows of ``param`` with their gradient ``grad``."""
        steps = self.steps[:active].add_(1)
        exp_avg = self.exp_avg[:active].lerp_(grad, 1 - self.beta1)
        exp_avg_sq = self.exp_avg_sq[:active].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = (self.lr / (1 - self.beta1**steps)).to(param.dtype)
        bias_correction2_sqrt = ((1 - self.beta2**steps) ** 0.5).to(param.dtype)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param[:active] -= step_size * exp_avg / denom


class BestOnLocalValidation:
    """Per device, the metapatch with the lowest local validation loss seen so far; the cloud model first."""

    def __init__(self, model, local, shape, chunk_size):
        self.model, self.local, self.chunk_size = model, local, chunk_size
        zeros = torch.zeros(shape, device=local.owner.device)
        self.cloud_loss = valid_losses(model, local, zeros, chunk_size)
        self.loss, self.metapatch = self.cloud_loss.clone(), zeros

    def consider(self, metapatch):
        loss = valid_losses(self.model, self.local, metapatch.detach(), self.chunk_size)
        better = loss < self.loss
        self.loss = torch.where(better, loss, self.loss)
        self.metapatch = torch.where(better.unsqueeze(1), metapatch.detach(), self.metapatch)

    def result(self, train_loss):
        adopted = (self.metapatch != 0).any(dim=1)
        return DeviceResult(self.metapatch, adopted, self.cloud_loss, self.loss, train_loss)


def device_settings(config):
    """The device phase's :class:`~dccl_device.settings.DeviceSettings` of ``config``."""
    return DeviceSettings.from_config(config, rows_per_positive(config))


def device_groups(local, max_rows):
    """Devices by decreasing number of training rows, cut into consecutive groups of at most ``max_rows`` local
    rows (a device with more rows alone)."""
    train_counts = torch.bincount(local.owner[~local.is_valid], minlength=len(local.users))
    counts = torch.bincount(local.owner, minlength=len(local.users))
    order = torch.argsort(train_counts, descending=True, stable=True)
    totals = torch.cumsum(counts[order], 0).tolist()
    groups, first, base = [], 0, 0
    for index, total in enumerate(totals):
        if total - base > max_rows and index > first:
            groups.append(order[first:index])
            first, base = index, totals[index - 1]
    return groups + [order[first:]]


def personalise(model, local, start, settings, seed, keep=None):
    """Train all devices' metapatches at once from ``start`` (``[devices, k]``); see the module docstring.

    The devices train group by group, each group's rows sized so that its cached site outputs fit in
    ``device_cache_mb``; a device's training depends on its own rows only, so grouping never changes a result.
    ``keep``: a :class:`RowCache` of the round's rows; when it can hold them, the devices read their outputs from
    it, and MoMoDistill's teachers then find them there."""
    with frozen(model):
        keys = local.shuffle_keys(settings.epochs, seed)
        cache, why_not = SiteCache.probe(model, local.interaction) if settings.cache_bytes else (None, "device_cache_mb=0")
        if cache is None:
            logging.getLogger().info(f"device phase: no site-output cache ({why_not}); the model runs every step")
            groups = device_groups(local, len(local.owner))
        else:
            groups = device_groups(local, max(settings.cache_bytes // cache.bytes_per_row, 1))
            logging.getLogger().info(
                f"device phase: site [{cache.site}] computed once per round, {len(groups)} group(s) of devices"
            )
        parts = []
        for devices in progress(groups, "Devices", settings.show_progress and len(groups) > 1):
            group, rows = local.subset(devices)
            if cache is not None and keep is not None and keep.ready(model, site=cache):
                group.cached = keep.lookup(group.key_index, model)
            elif cache is not None:
                group.cached = cache.outputs(model, group.interaction, settings.chunk_size)
            parts.append((devices, personalise_group(model, group, start[devices], keys[:, rows], settings)))
        return DeviceResult.gather(start.shape, parts, start.device)


def personalise_group(model, local, start, keys, settings):
    """:func:`personalise` for devices numbered by decreasing number of training rows."""
    train_rows = torch.nonzero(~local.is_valid).squeeze(1)
    counts = torch.bincount(local.owner[train_rows], minlength=len(local.users))
    guard = BestOnLocalValidation(model, local, start.shape, settings.chunk_size) if settings.valid_size else None
    every_epoch = guard is not None and settings.select == "best"
    if every_epoch:
        guard.consider(start)
    metapatch = start.clone()
    adam = PerDeviceAdam(metapatch, settings.learning_rate)
    epoch_loss = torch.full((len(local.users),), float("nan"), device=metapatch.device)  # per device
    for epoch in range(settings.epochs):
        rows, steps = epoch_steps(local, train_rows, keys[epoch][train_rows], settings.batch_size)
        epoch_loss = torch.zeros(len(local.users), device=metapatch.device)
        for step, (first, end) in enumerate(steps):
            in_step = (counts - step * settings.batch_size).clamp(0, settings.batch_size)
            active = int((in_step > 0).sum())
            trained = metapatch[:active].detach().requires_grad_(True)  # shares memory with metapatch
            for chunk in chunks(rows[first:end], settings.chunk_size):
                losses = row_losses(model, local, chunk, trained)
                (losses / in_step[local.owner[chunk]]).sum().backward()
                epoch_loss.index_add_(0, local.owner[chunk], losses.detach())
            if settings.l2:
                (settings.l2 * ((trained - start[:active]) ** 2).sum()).backward()
            adam.step(metapatch, trained.grad, active)
        if not torch.isfinite(epoch_loss.sum()):  # one check per epoch: no extra device sync per step
            raise NonFiniteLoss(f"the devices' training loss is {epoch_loss.sum().item()} in local epoch {epoch}")
        if every_epoch:
            guard.consider(metapatch)
    train_loss = epoch_loss / counts  # 0 / 0 = nan for a device without training rows
    if guard is None:
        return DeviceResult.unguarded(metapatch, train_loss)
    if not every_epoch:
        guard.consider(metapatch)
    return guard.result(train_loss)


def personalise_one_by_one(model, local, start, settings, seed, devices=None):
    """Reference for :func:`personalise`: a plain loop, one device and one ``torch.optim.Adam`` at a time, the
    whole model run for every minibatch. ``devices``: only these (indices into ``local.users``; default all), for
    benchmarks that time a sample; the result has their rows in that order."""
    with frozen(model):
        keys = local.shuffle_keys(settings.epochs, seed)
        devices = range(len(local.users)) if devices is None else [int(device) for device in devices]
        kept = torch.zeros(len(devices), start.shape[1], device=start.device)
        train_losses = torch.full((len(devices),), float("nan"), device=start.device)
        cloud_losses, kept_losses = [], []
        for index, device in enumerate(devices):
            own_rows = torch.nonzero((local.owner == device) & ~local.is_valid).squeeze(1)
            own_valid = torch.nonzero((local.owner == device) & local.is_valid).squeeze(1)

            @torch.no_grad()
            def valid_loss(metapatch_row):
                if len(own_valid) == 0:
                    return torch.tensor(float("nan"))
                interaction = take(local.interaction, own_valid)
                logits = model(interaction, metapatch_row.expand(len(own_valid), -1))
                return model.objective.loss(logits, interaction).mean()

            param = torch.nn.Parameter(start[device : device + 1].clone())
            optimizer = torch.optim.Adam([param], lr=settings.learning_rate)
            candidates = [start[device : device + 1]]
            for epoch_keys in keys:
                shuffled = own_rows[torch.argsort(epoch_keys[own_rows])]
                epoch_loss = 0.0
                for batch in chunks(shuffled, settings.batch_size):
                    interaction = take(local.interaction, batch)
                    # One row per minibatch row, as the batched phase takes them: the gradient then sums the rows
                    # the same way (expand's backward sums them in another order, and Adam's normalisation can
                    # turn that last-bit difference into 6e-5 on a device with ~30 rows).
                    owner = torch.zeros(len(batch), dtype=torch.long, device=param.device)
                    logits = model(interaction, gather_rows(param, owner))
                    loss = model.objective.loss(logits, interaction).mean()
                    epoch_loss += loss.item() * len(batch)
                    if settings.l2:
                        loss = loss + settings.l2 * ((param - start[device]) ** 2).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                candidates.append(param.detach().clone())
                train_losses[index] = epoch_loss / len(own_rows) if len(own_rows) else float("nan")
            if not settings.valid_size:
                kept[index] = param.detach()[0]
                continue
            best, best_loss = torch.zeros_like(param.detach()), valid_loss(torch.zeros_like(param.detach()))
            cloud_losses.append(best_loss)
            for candidate in candidates if settings.select == "best" else candidates[-1:]:
                loss = valid_loss(candidate)
                if loss < best_loss:
                    best, best_loss = candidate, loss
            kept[index], kept_losses = best[0], kept_losses + [best_loss]
        if not settings.valid_size:
            return DeviceResult.unguarded(kept, train_losses)
        as_tensor = lambda values: torch.stack(values).to(kept.device)
        return DeviceResult(kept, (kept != 0).any(dim=1), as_tensor(cloud_losses), as_tensor(kept_losses), train_losses)
