"""DCCL (Device-Cloud Collaborative Learning for Recommendation, KDD 2021) as a RecBole plugin."""

from recbole_dccl import compat  # noqa: F401  (before any RecBole config is built)
from recbole_dccl import download  # noqa: F401  (dataset_url and RecBole's download fix, see the module)

__version__ = "0.1.0"
