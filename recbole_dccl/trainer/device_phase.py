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
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from recbole_dccl.data import positions_from_newest
from recbole_dccl.errors import NonFiniteLoss
from recbole_dccl.trainer.progress import progress


@dataclass
class LocalData:
    """The rows the devices hold this round, with the device (index into ``users``) that owns each row."""

    interaction: object
    users: torch.Tensor
    owner: torch.Tensor
    is_valid: torch.Tensor

    @classmethod
    def from_rows(cls, dataset, rows, valid_size, device):
        interaction = dataset[torch.as_tensor(rows)].to(device)
        user_ids = interaction[dataset.uid_field]
        users, owner = torch.unique(user_ids, return_inverse=True)
        from_newest = torch.from_numpy(positions_from_newest(user_ids.cpu().numpy())).to(device)
        return cls(interaction, users, owner, from_newest < valid_size)


@dataclass
class DeviceResult:
    metapatch: torch.Tensor  # [devices, k]: what each device keeps (zero: the cloud model)
    adopted: torch.Tensor  # [devices] bool: the patch beat the cloud model on local validation
    valid_loss_cloud: torch.Tensor  # [devices] local validation loss of the cloud model (nan: no validation)
    valid_loss_device: torch.Tensor  # [devices] ... of what the device keeps

    @classmethod
    def unguarded(cls, metapatch):
        """Without local validation every device keeps what it trained."""
        nan = torch.full((len(metapatch),), float("nan"), device=metapatch.device)
        return cls(metapatch, (metapatch != 0).any(dim=1), nan, nan)


@contextmanager
def frozen(model):
    """Eval mode and no parameter gradients inside; restored after."""
    training = model.training
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)


def row_losses(model, local, rows, metapatch):
    """Per-row data loss of ``rows`` under their devices' rows of ``metapatch`` (``[devices, k]``)."""
    interaction = local.interaction[rows]
    logits = model(interaction, metapatch[local.owner[rows]])
    return model.objective.loss(logits, interaction)


def chunks(rows, size):
    return (rows[start : start + size] for start in range(0, len(rows), size))


@torch.no_grad()
def valid_losses(model, local, metapatch, chunk_size):
    """Each device's mean loss on its held-out rows (nan for devices without any)."""
    rows = torch.nonzero(local.is_valid).squeeze(1)
    total = torch.zeros(len(local.users), device=metapatch.device)
    for chunk in chunks(rows, chunk_size):
        total.index_add_(0, local.owner[chunk], row_losses(model, local, chunk, metapatch))
    count = torch.bincount(local.owner[rows], minlength=len(local.users))
    return total / count  # 0/0 = nan where a device holds nothing out


def epoch_order(local, train_rows, generator):
    """Train rows grouped by device, in a random order within each device, and each row's position there."""
    keys = torch.rand(len(train_rows), generator=generator).to(train_rows.device)
    order = torch.argsort(keys)
    order = order[torch.argsort(local.owner[train_rows][order], stable=True)]
    rows = train_rows[order]
    owners = local.owner[rows]
    first = torch.searchsorted(owners, torch.arange(len(local.users), device=rows.device))
    return rows, torch.arange(len(rows), device=rows.device) - first[owners]


class PerDeviceAdam:
    """``torch.optim.Adam``'s update with one state (moments, step count) per device (row of the parameter)."""

    def __init__(self, param, lr, betas=(0.9, 0.999), eps=1e-8):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = torch.zeros(len(param), dtype=torch.float64, device=param.device)

    @torch.no_grad()
    def step(self, param, grad, active):
        """Update the rows of ``param`` where ``active``."""
        self.steps[active] += 1
        steps = self.steps[active].unsqueeze(1)
        grad = grad[active]
        exp_avg = self.exp_avg[active].lerp_(grad, 1 - self.beta1)
        exp_avg_sq = self.exp_avg_sq[active].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        self.exp_avg[active], self.exp_avg_sq[active] = exp_avg, exp_avg_sq
        step_size = (self.lr / (1 - self.beta1**steps)).to(param.dtype)
        bias_correction2_sqrt = ((1 - self.beta2**steps) ** 0.5).to(param.dtype)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        param[active] -= step_size * exp_avg / denom


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

    def result(self):
        adopted = (self.metapatch != 0).any(dim=1)
        return DeviceResult(self.metapatch, adopted, self.cloud_loss, self.loss)


class DeviceSettings:
    def __init__(self, config):
        self.epochs = config["device_epochs"]
        self.learning_rate = config["device_learning_rate"]
        self.batch_size = config["device_batch_size"]
        self.valid_size = config["device_valid_size"]
        self.l2 = config["device_l2"]
        self.chunk_size = config["device_chunk_size"]
        self.show_progress = config["show_progress"]
        self.select = config["device_select"]


def personalise(model, local, start, settings, seed):
    """Train all devices' metapatches at once from ``start`` (``[devices, k]``); see the module docstring."""
    with frozen(model):
        train_rows = torch.nonzero(~local.is_valid).squeeze(1)
        guard = BestOnLocalValidation(model, local, start.shape, settings.chunk_size) if settings.valid_size else None
        every_epoch = guard is not None and settings.select == "best"
        if every_epoch:
            guard.consider(start)
        metapatch = start.clone().requires_grad_(True)
        adam = PerDeviceAdam(metapatch, settings.learning_rate)
        generator = torch.Generator().manual_seed(seed)
        for epoch in progress(range(settings.epochs), "Devices", settings.show_progress):
            rows, position = epoch_order(local, train_rows, generator)
            step_of_row = position // settings.batch_size
            epoch_loss = torch.zeros((), device=metapatch.device)
            for step in range(int(step_of_row.max()) + 1 if len(rows) else 0):
                step_rows = rows[step_of_row == step]
                count = torch.bincount(local.owner[step_rows], minlength=len(local.users))
                metapatch.grad = None
                for chunk in chunks(step_rows, settings.chunk_size):
                    losses = row_losses(model, local, chunk, metapatch)
                    (losses / count[local.owner[chunk]]).sum().backward()
                    epoch_loss += losses.detach().sum()
                if settings.l2:
                    pull = ((metapatch - start) ** 2).sum(dim=1)
                    (settings.l2 * pull[count > 0]).sum().backward()
                adam.step(metapatch, metapatch.grad, count > 0)
            if not torch.isfinite(epoch_loss):  # one check per epoch: no extra device sync per step
                raise NonFiniteLoss(f"the devices' training loss is {epoch_loss.item()} in local epoch {epoch}")
            if every_epoch:
                guard.consider(metapatch)
        if guard is None:
            return DeviceResult.unguarded(metapatch.detach())
        if not every_epoch:
            guard.consider(metapatch)
        return guard.result()


def personalise_one_by_one(model, local, start, settings, seed):
    """Reference for :func:`personalise`: a plain loop, one device and one ``torch.optim.Adam`` at a time."""
    with frozen(model):
        train_rows = torch.nonzero(~local.is_valid).squeeze(1)
        valid_rows = torch.nonzero(local.is_valid).squeeze(1)
        generator = torch.Generator().manual_seed(seed)
        epoch_keys = [torch.rand(len(train_rows), generator=generator) for _ in range(settings.epochs)]
        kept, cloud_losses, kept_losses = torch.zeros_like(start), [], []
        for device in range(len(local.users)):
            mine = (local.owner[train_rows] == device).cpu()
            own_rows = train_rows[mine.to(train_rows.device)]
            own_valid = valid_rows[local.owner[valid_rows] == device]

            @torch.no_grad()
            def valid_loss(metapatch_row):
                if len(own_valid) == 0:
                    return torch.tensor(float("nan"))
                interaction = local.interaction[own_valid]
                logits = model(interaction, metapatch_row.expand(len(own_valid), -1))
                return model.objective.loss(logits, interaction).mean()

            param = torch.nn.Parameter(start[device : device + 1].clone())
            optimizer = torch.optim.Adam([param], lr=settings.learning_rate)
            candidates = [start[device : device + 1]]
            for keys in epoch_keys:
                shuffled = own_rows[torch.argsort(keys[mine]).to(own_rows.device)]
                for batch in chunks(shuffled, settings.batch_size):
                    interaction = local.interaction[batch]
                    logits = model(interaction, param.expand(len(batch), -1))
                    loss = model.objective.loss(logits, interaction).mean()
                    if settings.l2:
                        loss = loss + settings.l2 * ((param - start[device]) ** 2).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                candidates.append(param.detach().clone())
            if not settings.valid_size:
                kept[device] = param.detach()[0]
                continue
            best, best_loss = torch.zeros_like(param.detach()), valid_loss(torch.zeros_like(param.detach()))
            cloud_losses.append(best_loss)
            for candidate in candidates if settings.select == "best" else candidates[-1:]:
                loss = valid_loss(candidate)
                if loss < best_loss:
                    best, best_loss = candidate, loss
            kept[device], kept_losses = best[0], kept_losses + [best_loss]
        if not settings.valid_size:
            return DeviceResult.unguarded(kept)
        as_tensor = lambda values: torch.stack(values).to(kept.device)
        return DeviceResult(kept, (kept != 0).any(dim=1), as_tensor(cloud_losses), as_tensor(kept_losses))
