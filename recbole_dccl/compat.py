"""Shims that let RecBole 1.2.1 run on the libraries of today (see docs/installation.md), and one setting it
changes for the whole process that we undo.

NumPy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which RecBole's ``Config`` reads to restore
the older aliases its metrics and datasets still use. We put them back before RecBole looks for them. The
supported install pins ``numpy<2``, where this does nothing; the shim is for environments that cannot pin.
"""

import numpy as np

for _alias, _target in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _target)

# RecBole's SINE module calls ``torch.autograd.set_detect_anomaly(True)`` when imported, and importing any
# sequential model imports it: every backward pass then checks every gradient for NaN and every forward pass
# records a traceback (a third of the device phase's time, docs/performance.md). Import it now and switch that off.
import recbole.model.sequential_recommender  # noqa: E402,F401
import torch  # noqa: E402

torch.autograd.set_detect_anomaly(False)
