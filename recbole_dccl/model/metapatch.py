"""MetaPatch: residual bottleneck patches whose weights are generated from a per-user metapatch.

At a patch site with output ``z`` (last dimension ``d``) the device model computes ``z + gelu(z @ D) @ U`` with
``D = base + sum_k metapatch_k * Theta_D[k]`` (``d x r``) and ``U = sum_k metapatch_k * Theta_U[k]``
(``r x d``). ``Theta`` and ``base`` are the global shared parameters, learned on the cloud; the metapatch (``k``
numbers) is all a device learns. ``U`` has no base, so a zero metapatch is exactly the cloud model, and the
gradient with respect to the metapatch is not zero there (as LoRA starts its up-projection at zero). GELU rather than
ReLU: a ReLU bottleneck whose units are all negative for a user's rows gives that user no gradient at all.

Sites are attached by module name, like PEFT's ``target_modules``: the module's ``forward`` is wrapped on the
instance, which catches both ``module(x)`` and the ``self.forward(...)`` calls RecBole models make on themselves.
The wrapper can also report each site's unpatched output (``PatchContext.capture``) and stand in a given output for
a site's own computation (``PatchContext.replay``): the device phase uses both to run the frozen backbone below the
lowest site once per round instead of once per step (``recbole_dccl/trainer/site_cache.py``).
"""

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from recbole_dccl.errors import InputError


class ResidualBottleneck(nn.Module):
    """``z + gelu(z @ D) @ U`` with per-row ``D`` (``d x r``) and ``U`` (``r x d``) from :meth:`weights`.
    ``forward(z, vector)``: ``z`` is ``[B, ..., d]``, one user vector per ``z`` row (``[B, n]``)."""

    def __init__(self, dim, rank):
        super().__init__()
        self.dim, self.rank = dim, rank
        self.base_down = nn.Parameter(torch.empty(dim, rank))
        nn.init.normal_(self.base_down, std=1.0 / math.sqrt(dim))

    def forward(self, z, vector):
        down, up = self.weights(vector)
        flat = z.reshape(z.shape[0], -1, z.shape[-1])
        patch = torch.bmm(F.gelu(torch.bmm(flat, down)), up)
        return z + patch.reshape(z.shape)


class MetaPatch(ResidualBottleneck):
    """``device_method: metapatch``: the weights are generated from the user's metapatch (``k`` numbers, shared
    by all sites) through the global shared parameters ``Theta``."""

    def __init__(self, dim, rank, metapatch_dim):
        super().__init__(dim, rank)
        self.theta_down = nn.Parameter(torch.empty(metapatch_dim, dim, rank))
        self.theta_up = nn.Parameter(torch.empty(metapatch_dim, rank, dim))
        nn.init.normal_(self.theta_down, std=1.0 / math.sqrt(dim * metapatch_dim))
        nn.init.normal_(self.theta_up, std=1.0 / math.sqrt(rank * metapatch_dim))

    def weights(self, metapatch):
        down = self.base_down + torch.einsum("bk,kdr->bdr", metapatch, self.theta_down)
        up = torch.einsum("bk,krd->brd", metapatch, self.theta_up)
        return down, up

    def forward(self, z, metapatch):
        # The same function as the per-row D and U of weights(), without forming them: z meets every Theta_D[k]
        # in one matmul and the metapatch weights the results (likewise gelu(z @ D) ⊗ metapatch meets Theta_U).
        rows, dim = z.shape[0], z.shape[-1]
        metapatch_dim, rank = self.theta_up.shape[:2]
        flat = z.reshape(rows, -1, dim)
        weights = metapatch[:, None, :, None]  # [B, 1, k, 1]
        theta_down = self.theta_down.permute(1, 0, 2).reshape(dim, metapatch_dim * rank)
        by_theta = (flat @ theta_down).view(rows, -1, metapatch_dim, rank)
        hidden = F.gelu(flat @ self.base_down + (by_theta * weights).sum(dim=2))
        weighted = (hidden.unsqueeze(2) * weights).reshape(rows, -1, metapatch_dim * rank)
        patch = weighted @ self.theta_up.reshape(metapatch_dim * rank, dim)
        return z + patch.reshape(z.shape)


class UserPatch(ResidualBottleneck):
    """``device_method: patch`` (ablation): the user's vector holds this site's ``D - base`` and ``U`` themselves,
    at ``offset`` in the concatenation over all sites; nothing is generated."""

    def __init__(self, dim, rank, offset):
        super().__init__(dim, rank)
        self.offset = offset

    @staticmethod
    def size(dim, rank):
        return 2 * dim * rank

    def weights(self, vector):
        own = vector[:, self.offset : self.offset + self.size(self.dim, self.rank)]
        down, up = own.split(self.dim * self.rank, dim=1)
        return self.base_down + down.view(-1, self.dim, self.rank), up.view(-1, self.rank, self.dim)


class SiteReached(Exception):
    """Ends a forward pass at the first captured site when ``PatchContext.stop_at_capture`` is set."""


class PatchContext:
    """The metapatch rows of the batch being computed (``None`` runs the cloud model untouched); ``capture``: a
    list that receives ``(site name, unpatched output)`` as each site returns (with ``stop_at_capture``, the first
    one ends the forward pass: :class:`SiteReached`); ``replay``: site name -> the unpatched output to use instead
    of running that site."""

    def __init__(self):
        self.metapatch = None
        self.capture = None
        self.stop_at_capture = False
        self.replay = {}


def find_sites(root, root_name, patterns):
    """Names of ``root``'s modules (``root_name`` for ``root`` itself, ``root_name.child`` below) matching any
    pattern exactly or as a full regex. Unknown patterns raise ``ValueError`` listing the valid names."""
    modules = {(f"{root_name}.{name}" if name else root_name): module for name, module in root.named_modules()}
    sites = {}
    for pattern in patterns:
        matched = [name for name in modules if name == pattern or re.fullmatch(pattern, name)]
        if not matched:
            raise InputError(
                f"patch_sites: [{pattern}] matches no module of the backbone. Valid names: {', '.join(modules)}"
            )
        sites.update((name, modules[name]) for name in matched)
    return sites


def wrap_site(name, module, patch_for_output, context):
    """Make site ``name`` (``module``) add its patch to its output whenever ``context.metapatch`` is set."""
    original = module.forward

    def forward(*args, **kwargs):
        output = context.replay[name] if name in context.replay else original(*args, **kwargs)
        if context.capture is not None:
            context.capture.append((name, output))
            if context.stop_at_capture:
                raise SiteReached
        if context.metapatch is None:
            return output
        return patch_for_output(output, context.metapatch)

    module.forward = forward


def site_output_dims(sites, run):
    """The last dimension of each site's output, read while ``run()`` drives the model once."""
    dims = {}

    def recorder(name, original):
        def forward(*args, **kwargs):
            output = original(*args, **kwargs)
            if not isinstance(output, torch.Tensor):
                raise InputError(
                    f"patch_sites: [{name}] returns {type(output).__name__}, not a tensor; "
                    "choose a module whose output is one tensor."
                )
            dims.setdefault(name, output.shape[-1])
            return output

        return forward

    for name, module in sites.items():
        module.forward = recorder(name, module.forward)
    try:
        run()
    finally:
        for module in sites.values():
            del module.forward  # back to the class's forward
    missing = [name for name in sites if name not in dims]
    if missing:
        raise InputError(f"patch_sites: {missing} never run when the backbone scores a batch; choose modules on its path.")
    return dims
