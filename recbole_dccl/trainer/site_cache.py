"""Run the frozen model below the lowest patch site once per round instead of once per device step.

In the device phase only the metapatches change. The first patch site to return in a forward pass (the lowest
site) has no patch below it, so its unpatched output depends on the frozen model and the row alone: it is computed
once per local row (cloud view, in chunks) and every step then runs the model with that output standing in for the
site's own computation (``PatchContext.replay``). What runs per step is the patch and the model above the site:
with the default site (``backbone``, the sequence representation) the patch and the objective's item scoring.

This needs the lowest site to run once per forward pass and to return one row per input row. Where it does not,
:meth:`SiteCache.probe` says why and the device phase runs the whole model every step, as before.

The cloud phase reuses the idea for the round's rows (numbered by ``ROW_FIELD``), in :class:`RowCache`: the frozen
teachers of MoMoDistill read the outputs the device phase computed (the backbone below the site has not changed
since), and step 2, whose backbone is frozen, computes them in its first epoch and replays them in the others.
"""

from contextlib import contextmanager

import torch

from recbole_dccl.data import ROW_FIELD
from recbole_dccl.model.metapatch import SiteReached


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
    def outputs(self, model, interaction, chunk_size):
        """The site's unpatched output for every row of ``interaction``, computed ``chunk_size`` rows at a time
        (the model stops at the site)."""
        parts = []
        for start in range(0, len(interaction), chunk_size):
            with capturing(model, stop=True) as captured:
                model(interaction[start : start + chunk_size])
            parts.append(captured[0][1])
        return {self.site: torch.cat(parts)}


class RowCache:
    """The lowest site's outputs for the rows ``0 .. rows - 1`` of one dataset (a round's rows), kept as they are
    computed, for as long as the model below the site is frozen. Holds nothing when they would take more than
    ``max_bytes`` or when the model's sites cannot be cached."""

    def __init__(self, rows, max_bytes):
        self.rows, self.max_bytes = rows, max_bytes
        self.site = None  # the SiteCache, once probed
        self.usable = max_bytes > 0
        self.outputs = self.filled = None

    def ready(self, model, interaction, site=None):
        """Whether outputs can be kept for ``model``; the first call takes its lowest ``site`` (a :class:`SiteCache`)
        from a caller that has probed it, or probes it on ``interaction``."""
        if self.usable and self.site is None:
            self.site = site if site is not None else SiteCache.probe(model, interaction)[0]
            self.usable = self.site is not None and self.site.bytes_per_row * self.rows <= self.max_bytes
        return self.usable

    def store(self, rows, outputs):
        """Keep ``outputs`` (site name -> ``[len(rows), ...]``) of ``rows``."""
        if not self.usable:
            return
        (values,) = outputs.values()
        if self.outputs is None:
            self.outputs = values.new_empty((self.rows, *values.shape[1:]))
            self.filled = torch.zeros(self.rows, dtype=torch.bool, device=values.device)
        self.outputs[rows] = values.detach()
        self.filled[rows] = True

    def lookup(self, rows):
        """``{site: outputs of rows}`` if every one of ``rows`` is kept, else ``None``."""
        if self.outputs is None or not bool(self.filled[rows].all()):
            return None
        return {self.site.site: self.outputs[rows]}


def cached_forward(model, cache, interaction, forward):
    """``forward()`` (a pass of ``model`` over ``interaction``) with the lowest site's output taken from ``cache``
    when it holds all of the interaction's rows, else computed and kept there. Rows without a number
    (``ROW_FIELD``) or a cache that cannot hold them run ``forward()`` as it is."""
    if cache is None or ROW_FIELD not in interaction or not cache.ready(model, interaction):
        return forward()
    rows = interaction[ROW_FIELD]
    outputs = cache.lookup(rows)
    if outputs is not None:
        with replaying(model, outputs):
            return forward()
    with capturing(model) as captured:
        result = forward()
    cache.store(rows, dict(captured[:1]))
    return result
