"""DCCL (Device-Cloud Collaborative Learning for Recommendation, KDD 2021) as a RecBole plugin."""

from recbole_dccl import compat  # noqa: F401  (before any RecBole config is built)

__version__ = "0.1.0"
