"""Tiny datasets written by the tests themselves, and the settings that keep every run to seconds."""

import os

import numpy as np
import pytest

TINY_SETTINGS = {
    "embedding_size": 16,
    "hidden_size": 16,
    "n_layers": 1,
    "n_heads": 1,
    "inner_size": 32,
    "MAX_ITEM_LIST_LENGTH": 8,
    "epochs": 2,
    "train_batch_size": 128,
    "eval_batch_size": 256,
    "metapatch_dim": 4,
    "patch_rank": 3,
    "fresh_interactions": 3,
    "device_epochs": 3,
    "device_batch_size": 2,
    "device_learning_rate": 0.05,
    "shared_epochs": 2,
    "encoder_hidden_size": 8,
    "encoder_embedding_size": 4,
    "show_progress": False,
    "seed": 2020,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
}


def write_dataset(folder, name="tiny", users=30, items=40, with_profiles=True, seed=0):
    """RecBole atomic files for ``users`` users with 10 to 25 time-ordered interactions each, and item features
    (named as ml-100k's, which RecBole's feature-aware models select by default)."""
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{name}.inter"), "w") as file:
        file.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for user in range(1, users + 1):
            taste = rng.integers(1, items + 1)
            for step in range(rng.integers(10, 26)):
                item = (taste + step + rng.integers(0, 3)) % items + 1
                file.write(f"{user}\t{item}\t{rng.integers(1, 6)}\t{1000 * user + step}\n")
    if with_profiles:
        with open(os.path.join(path, f"{name}.user"), "w") as file:
            file.write("user_id:token\tage:token\tgender:token\n")
            for user in range(1, users + 1):
                file.write(f"{user}\t{rng.integers(1, 5) * 10}\t{'MF'[user % 2]}\n")
    item_rng = np.random.default_rng(seed + 1)
    with open(os.path.join(path, f"{name}.item"), "w") as file:
        file.write("item_id:token\trelease_year:token\tclass:token_seq\n")
        for item in range(1, items + 1):
            classes = " ".join(f"c{c}" for c in item_rng.choice(6, size=item_rng.integers(1, 3), replace=False))
            file.write(f"{item}\t{1990 + item % 7}\t{classes}\n")
    return folder


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """A folder holding dataset ``tiny``; RecBole's log/ and saved/ go to the test's own folder."""
    monkeypatch.chdir(tmp_path)
    return write_dataset(str(tmp_path / "data"))


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """config_dict for a DCCL run on the tiny dataset."""
    return {**TINY_SETTINGS, "data_path": tiny_data, "checkpoint_dir": str(tmp_path / "saved")}


@pytest.fixture
def ctr_config(tiny_config):
    """config_dict for a DCCL run over a CTR backbone: every field loaded (ratings give the labels)."""
    return {**tiny_config, "backbone": "DeepFM", "load_col": None, "mlp_hidden_size": [8, 8]}


@pytest.fixture
def implicit_config(tiny_config):
    """config_dict for a DCCL run over a CTR backbone on implicit data: no rating loaded, so no labels (the
    implicit-data quick start samples negatives); item features loaded, which negatives must take from their item."""
    load_col = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "release_year"]}
    return {**tiny_config, "backbone": "DeepFM", "mlp_hidden_size": [8, 8], "load_col": load_col}
