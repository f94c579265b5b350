from recbole_dccl.model.dccl import DCCL

__all__ = ["DCCL"]
