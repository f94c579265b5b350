"""Run the frozen model below the lowest patch site once per round instead of once per device step.

In the device phase only the metapatches change. The first patch site to return in a forward pass (the lowest
site) has no patch below it, so its unpatched output depends on the frozen model and the row alone: it is computed
once per local row (cloud view, in chunks) and every step then runs the model with that output standing in for the
site's own computation (``PatchContext.replay``). What runs per step is the patch and the model above the site:
with the default site (``backbone``, the sequence representation) the patch and the objective's item scoring.

This needs the lowest site to run once per forward pass and to return one row per input row. Where it does not,
:meth:`SiteCache.probe` says why and the device phase runs the whole model every step, as before.
"""

from contextlib import contextmanager

import torch

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
