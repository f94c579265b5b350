from recbole_dccl.trainer.dccl_trainer import DCCLTrainer

__all__ = ["DCCLTrainer"]
