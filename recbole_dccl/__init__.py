"""DCCL (Device-Cloud Collaborative Learning for Recommendation, KDD 2021) as a RecBole plugin."""

__version__ = "0.1.0"
