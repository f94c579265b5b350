"""Shims that let RecBole 1.2.1 run on the libraries of today (see docs/installation.md).

NumPy 2 removed ``np.float_``, ``np.complex_`` and ``np.unicode_``, which RecBole's ``Config`` reads to restore
the older aliases its metrics and datasets still use. We put them back before RecBole looks for them. The
supported install pins ``numpy<2``, where this does nothing; the shim is for environments that cannot pin.
"""

import numpy as np

for _alias, _target in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if _alias not in np.__dict__:
        setattr(np, _alias, _target)
