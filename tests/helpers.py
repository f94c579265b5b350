"""Build config, data and model the way run_recbole_dccl does, for tests that need the pieces."""

import logging

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed

from recbole_dccl.config import DCCLConfig
from recbole_dccl.utils import get_model, get_trainer


def build(config_dict, model="DCCL", dataset="tiny"):
    config = DCCLConfig(model=model, dataset=dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logging.getLogger().setLevel(logging.ERROR)
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    net = get_model(config["model"])(config, train_data.dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    return config, (train_data, valid_data, test_data), net, trainer
