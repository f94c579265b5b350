"""Shims that let RecBole 1.2.1 run on the libraries of today (see docs/installation.md), and one setting it
changes for the whole process that we undo.

NumPy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which RecBole's ``Config`` reads to restore
the older aliases its metrics and datasets still use. We put them back before RecBole looks for them. The
supported install pins ``numpy<2``, where this does nothing; the shim is for environments that cannot pin.

RecBole 1.2.1's SINE module switches on autograd anomaly detection for the whole process when it is imported,
and importing any sequential model imports it (``recbole.model.sequential_recommender`` imports every model).
Anomaly detection records a stack trace for every operation and checks every backward pass for nan: it slows
training, and a nan loss would surface as its ``RuntimeError`` rather than as our ``NonFiniteLoss``. We import
the package once here and switch it back off.
"""

import numpy as np
import torch

for _alias, _target in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _target)

import recbole.model.sequential_recommender  # noqa: E402,F401  (after the aliases: it imports RecBole's models)

torch.autograd.set_detect_anomaly(False)
