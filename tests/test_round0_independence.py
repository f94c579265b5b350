"""Round 0 (the cloud-only model) must not depend on any device-side setting: a user comparing two device settings in
two runs compares them on one cloud model."""

import os

import torch

from recbole_dccl.defaults import dccl_defaults
from recbole_dccl.quick_start import run_recbole_dccl

from tests.helpers import build

# A value other than the tiny runs' for every DCCL key that is not about the data protocol or files.
OTHER_VALUES = {
    "device_method": "patch",
    "device_memory": False,
    "memory_gate": True,
    "device_participation": 0.5,
    "device_dropout": 0.3,
    "stale_teachers": True,
    "device_availability": "a trace file",  # written by other_values
    "upload_dtype": "int8",
    "dp_clip": 1.0,
    "dp_noise_multiplier": 0.5,
    "dp_delta": 1e-6,
    "cloud_method": "data",
    "patch_sites": "backbone.dense",
    "metapatch_dim": 64,
    "patch_rank": 5,
    "device_data": "fresh",
    "device_epochs": 1,
    "device_learning_rate": 0.5,
    "device_batch_size": 7,
    "device_valid_size": 2,
    "device_select": "last",
    "device_l2": 0.1,
    "device_chunk_size": 3,
    "device_cache_mb": 0,
    "cloud_epochs": 2,
    "distill_weight": 0.3,
    "distill_temperature": 2.0,
    "shared_epochs": 1,
    "shared_learning_rate": 0.1,
    "shared_ce_weight": 0.5,
    "encoder_embedding_size": 8,
    "encoder_hidden_size": 16,
}
NEEDS = {"dp_noise_multiplier": {"dp_clip": 1.0}}  # a key whose other value is valid only with another's
ROUND_0_KEYS = ("backbone", "protocol", "fresh_interactions", "rounds", "cold_start_ratio")
FILE_KEYS = ("cloud_checkpoint", "resume", "result_file")


def other_values(folder):
    """:data:`OTHER_VALUES` with a ``device_availability`` trace written to ``folder`` (every tiny user online in
    round 1)."""
    trace = os.path.join(folder, "online.tsv")
    with open(trace, "w") as file:
        file.write("user_id:token\trounds:token_seq\n" + "".join(f"{user}\t1\n" for user in range(1, 31)))
    return {**OTHER_VALUES, "device_availability": trace}


def backbone_and_stream(config_dict):
    """The freshly built backbone's weights and the global random stream round 0 then trains from."""
    _, _, model, _ = build(config_dict)
    return model.backbone.state_dict(), torch.random.get_rng_state()


def test_every_device_side_key_is_covered():
    assert set(OTHER_VALUES) == set(dccl_defaults()) - set(ROUND_0_KEYS) - set(FILE_KEYS)


def test_round_0_starts_from_the_same_backbone_and_random_stream_for_every_device_side_key(tiny_config, tmp_path):
    weights, stream = backbone_and_stream(tiny_config)
    for key, value in {**other_values(tmp_path), "device_method": "none"}.items():
        other_weights, other_stream = backbone_and_stream({**tiny_config, key: value, **NEEDS.get(key, {})})
        assert torch.equal(other_stream, stream), key
        assert other_weights.keys() == weights.keys(), key
        assert all(torch.equal(other_weights[name], weights[name]) for name in weights), key


def test_round_0_model_is_bit_for_bit_the_same_whatever_the_device_side_settings(tiny_config, tmp_path):
    models = []
    for name, settings in (("defaults", {}), ("others", other_values(tmp_path))):
        path = str(tmp_path / f"{name}.pth")
        run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**tiny_config, **settings, "epochs": 1,
                         "cloud_checkpoint": path}, saved=False, verbose=False)
        models.append(torch.load(path, weights_only=True)["state_dict"])
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])


def test_a_run_that_loads_its_round_0_goes_on_exactly_as_the_run_that_trained_it(tiny_config, tmp_path):
    """Step 1 trains W_f with dropout: it draws from streams that round 0's training would have moved on."""
    histories = []
    for _ in range(2):  # the first run trains round 0 and writes the checkpoint, the second loads it
        config, (train_data, valid_data, _), model, trainer = build({
            **tiny_config, "dropout_prob": 0.3, "metric_decimal_place": 10,
            "cloud_checkpoint": str(tmp_path / "cloud.pth"),
        })
        trainer.fit(train_data, valid_data, verbose=False, saved=False)
        histories.append(trainer.record.history)
    assert histories[0][1:] == histories[1][1:]  # every phase of round 1, both views, every metric
