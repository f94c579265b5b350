"""Run the frozen model below the lowest patch site once per round instead of once per device step.

In the device phase only the metapatches change. The first patch site to return in a forward pass (the lowest
site) has no patch below it, so its unpatched output depends on the frozen model and the row alone: it is computed
once per local row (cloud view, in chunks) and every step then runs the model with that output standing in for the
site's own computation (``PatchContext.replay``). What runs per step is the patch and the model above the site:
with the default site (``backbone``, the sequence representation) the patch and the objective's item scoring.

This needs the lowest site to run once per forward pass and to return one row per input row. Where it does not,
:meth:`SiteCache.probe` says why and the device phase runs the whole model every step, as before.

The cloud phase reuses the idea for the round's rows (numbered by ``ROW_FIELD``), in :class:`RowCache`: the frozen
teachers of MoMoDistill read the outputs the device phase asked for (the backbone below the site has not changed
since), and step 2, whose backbone is frozen, computes its own once and replays them in every epoch. A
:class:`RowCache` computes all its rows at its first lookup, always in row order and in the same chunks, so a row's
output never depends on who asked first: a run resumed in the middle of a round reads the very values the
uninterrupted run read (the same row computed within other rows can differ in the last bit: a matmul's kernel, and
so its rounding, depends on the number of rows).
"""

from contextlib import contextmanager

import torch
from torch.func import functional_call

from recbole_dccl.model.metapatch import SiteReached
from recbole_dccl.rounds import ROW_FIELD


@contextmanager
def capturing(model, stop=False):
    """Collect ``(site name, unpatched output)`` of every site as it returns, in order; with ``stop``, only the
    first, and the forward pass ends there (nothing above the site is computed)."""
    model.context.capture, model.context.stop_at_capture = [], stop
    try:
        yield model.context.capture
    except SiteReached:
        pass
    finally:
        model.context.capture, model.context.stop_at_capture = None, False


@contextmanager
def replaying(model, outputs):
    """Run the sites named in ``outputs`` (name -> tensor) as if they had returned those tensors."""
    model.context.replay = outputs
    try:
        yield
    finally:
        model.context.replay = {}


class SiteCache:
    """The lowest site of a model and how to compute its outputs for many rows."""

    def __init__(self, site, bytes_per_row):
        self.site = site
        self.bytes_per_row = bytes_per_row

    @classmethod
    @torch.no_grad()
    def probe(cls, model, interaction):
        """``(cache, None)``, or ``(None, why the model's sites cannot be cached)``, from two forward passes on the
        first rows of ``interaction``: one of them must be the other's rows less the last."""
        rows = min(len(interaction), 5)
        if rows < 2:
            return None, "fewer than two local rows"
        outputs = []
        for size in (rows, rows - 1):
            with capturing(model) as captured:
                model(interaction[:size])
            outputs.append(captured)
        site, output = outputs[0][0]
        calls = sum(name == site for name, _ in outputs[0])
        if calls != 1:
            return None, f"the lowest patch site [{site}] runs {calls} times per forward pass"
        fewer = outputs[1][0][1]
        if output.shape[0] != rows or fewer.shape[0] != rows - 1 or not torch.allclose(output[:-1], fewer, atol=1e-5):
            return None, f"the lowest patch site [{site}] does not return one output row per input row"
        return cls(site, output[0].numel() * output.element_size()), None

    @torch.no_grad()
    def outputs(self, model, rows, chunk_size, state=None, device=None):
        """The site's unpatched output for every row of ``rows`` (an ``Interaction``, or a RecBole dataset read a
        chunk at a time and moved to ``device``), computed ``chunk_size`` rows at a time by ``model``, or by
        ``model`` with the parameters and buffers ``state`` (the model stops at the site)."""
        parts = []
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            if device is not None:
                chunk = chunk.to(device)
            with capturing(model, stop=True) as captured:
                model(chunk) if state is None else functional_call(model, state, (chunk,))
            parts.append(captured[0][1])
        return {self.site: torch.cat(parts)}


class RowCache:
    """The lowest site's outputs for every row of one round's ``data`` (a RecBole dataset whose rows are numbered
    ``0 .. len(data) - 1`` by ``ROW_FIELD``), for as long as the model below the site is frozen. The first lookup
    computes them all, in row order, ``chunk_size`` rows at a time on ``device``, whoever asks first (the device
    phase for its devices, a teacher or step 2 for a training batch, a resumed run for the batch it starts with).
    Holds nothing when they would take more than ``max_bytes`` or when the model's sites cannot be cached."""

    def __init__(self, data, device, max_bytes, chunk_size):
        self.data, self.device, self.max_bytes, self.chunk_size = data, device, max_bytes, chunk_size
        self.site = None  # the SiteCache, once probed
        self.usable = max_bytes > 0 and len(data) > 0
        self.outputs = None

    def ready(self, model, site=None):
        """Whether outputs can be kept for ``model``; the first call takes its lowest ``site`` (a :class:`SiteCache`)
        from a caller that has probed it, or probes it on the first rows."""
        if self.usable and self.site is None:
            self.site = site if site is not None else SiteCache.probe(model, self.data[:5].to(self.device))[0]
            self.usable = self.site is not None and self.site.bytes_per_row * len(self.data) <= self.max_bytes
        return self.usable

    def lookup(self, rows, model, state=None):
        """``{site: outputs of rows}``, all rows computed at the first call by ``model`` (with the parameters and
        buffers ``state``, if given: the model below the site must be the same at every call)."""
        if self.outputs is None:
            self.outputs = self.site.outputs(model, self.data, self.chunk_size, state, self.device)[self.site.site]
        return {self.site.site: self.outputs[rows]}


def cached_forward(model, cache, interaction, forward, state=None):
    """``forward()`` (a pass of ``model``, or of ``model`` with the parameters and buffers ``state``, over
    ``interaction``) with the lowest site's output taken from ``cache``. Rows without a number (``ROW_FIELD``) or a
    cache that cannot hold them run ``forward()`` as it is."""
    if cache is None or ROW_FIELD not in interaction or not cache.ready(model):
        return forward()
    with replaying(model, cache.lookup(interaction[ROW_FIELD], model, state)):
        return forward()
