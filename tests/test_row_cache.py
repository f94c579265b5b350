"""The round's cached site outputs in the cloud phase: MoMoDistill's teachers read what the device phase computed,
step 2 computes its own once; neither changes a result, and whoever asks first, every row is computed alike."""

import pytest
import torch

from recbole_dccl.quick_start import run_recbole_dccl
from recbole_dccl.rounds import ROW_FIELD, RoundSchedule
from recbole_dccl.trainer.momodistill import DeviceTeachers, shared_parameters_epoch
from recbole_dccl.trainer.site_cache import RowCache
from tests.helpers import build


def counting_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def round_one(tiny_config, settings=None):
    config, (train_data, _, _), model, trainer = build({**tiny_config, **(settings or {})})
    trainer.verbose = False
    rows = trainer.start_round(RoundSchedule(config, train_data), 1)
    return config, train_data, model, trainer, rows


def test_round_loader_numbers_its_rows(tiny_config):
    _, _, _, trainer, rows = round_one(tiny_config)
    numbers = torch.cat([batch[ROW_FIELD] for batch in trainer.round.loader])
    assert sorted(numbers.tolist()) == list(range(len(rows)))


def test_teachers_run_from_the_device_phase_outputs(tiny_config):
    config, train_data, model, trainer, rows = round_one(tiny_config)
    trainer.device_phase(1, rows)
    assert len(trainer.round.cache.outputs) == len(rows)  # the device phase kept the outputs of every round row
    cached, plain = DeviceTeachers(model, cache=trainer.round.cache), DeviceTeachers(model)
    gru_calls = counting_calls(model.backbone.gru_layers)
    for batch in trainer.round.loader:
        batch = batch.to(config["device"])
        before = len(gru_calls)
        teacher_logits = cached.logits(batch)
        assert len(gru_calls) == before  # nothing below the site ran
        assert torch.allclose(teacher_logits, plain.logits(batch), atol=1e-6)


def test_teachers_fill_the_cache_when_the_device_phase_did_not(tiny_config):
    config, _, model, trainer, _ = round_one(tiny_config)
    with torch.no_grad():
        model.uploaded_metapatch.normal_(generator=torch.Generator().manual_seed(0))
    cached, plain = DeviceTeachers(model, cache=trainer.round.cache), DeviceTeachers(model)
    gru_calls = counting_calls(model.backbone.gru_layers)
    batches = [batch.to(config["device"]) for batch in trainer.round.loader]
    first = [cached.logits(batch) for batch in batches]
    calls = len(gru_calls)
    again = [cached.logits(batch) for batch in batches]
    assert calls > 0 and len(gru_calls) == calls  # computed at the first batch, replayed ever after
    for batch, one, two in zip(batches, first, again):
        assert torch.allclose(one, plain.logits(batch), atol=1e-6) and torch.allclose(two, one, atol=1e-6)


def test_step_2_from_its_cached_outputs_equals_running_the_backbone(tiny_config):
    def shared_after_two_epochs(cache):
        config, _, model, trainer, _ = round_one(tiny_config)
        with torch.no_grad():
            model.uploaded_metapatch.normal_(generator=torch.Generator().manual_seed(0))
        teachers = DeviceTeachers(model)
        shared = list(model.patches.parameters()) + list(model.encoder.parameters())
        optimizer = trainer._build_optimizer(params=shared, learning_rate=config["shared_learning_rate"])
        cache = trainer.row_cache() if cache else None
        torch.manual_seed(5)
        for _ in range(2):
            shared_parameters_epoch(model, trainer.round.loader, optimizer, teachers, config, cache)
        return cache, {name: value for name, value in model.state_dict().items() if not name.startswith("backbone.")}

    cache, with_cache = shared_after_two_epochs(cache=True)
    _, without = shared_after_two_epochs(cache=False)
    assert cache.outputs is not None
    for name, value in without.items():
        assert torch.allclose(with_cache[name], value, atol=1e-5), name


def test_a_cache_over_its_memory_budget_holds_nothing(tiny_config):
    config, _, model, trainer, rows = round_one(tiny_config)
    max_bytes = 4 * tiny_config["hidden_size"] * len(rows) - 1
    too_small = RowCache(trainer.round.loader.dataset, config["device"], max_bytes, chunk_size=1024)
    teachers = DeviceTeachers(model, cache=too_small)
    batch = next(iter(trainer.round.loader)).to(config["device"])
    teachers.logits(batch)
    assert not too_small.usable and too_small.outputs is None


@pytest.mark.parametrize("protocol", ["incremental", "static"])
def test_cached_site_outputs_never_change_a_run(tiny_config, protocol):
    settings = {**tiny_config, "protocol": protocol}
    cached = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict=settings, verbose=False)
    uncached = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**settings, "device_cache_mb": 0}, verbose=False)
    for view in ("cloud_only", "dccl_cloud", "dccl_device"):
        for split in ("valid", "test"):
            for metric, value in uncached[view][split].items():
                assert cached[view][split][metric] == pytest.approx(value, abs=1e-4), (view, split, metric)
