import dataclasses

import pytest
import torch

from recbole_dccl.model.metapatch import PatchContext, wrap_site
from recbole_dccl.rounds import RoundSchedule
from recbole_dccl.trainer.device_phase import (
    LocalData, device_settings, gather_rows, personalise, personalise_one_by_one,
)
from recbole_dccl.trainer.site_cache import SiteCache
from tests.helpers import build


def local_setup(config_dict, protocol="incremental"):
    config, (train_data, _, _), model, _ = build({**config_dict, "protocol": protocol})
    schedule = RoundSchedule(config, train_data)
    rows = schedule.training_rows(schedule.device_rows(1), 1)
    settings = device_settings(config)
    local = LocalData.from_rows(rows, settings.valid_size, config["device"])
    return config, model, local, settings


def random_start(model, local):
    """Every device's starting metapatch, small and random (a device phase after the first round's)."""
    return 0.1 * torch.randn(len(local.users), model.metapatch.shape[1], generator=torch.Generator().manual_seed(0))


def batched_and_loop(model, local, settings):
    """The batched device phase and the per-device loop from the same random start, checked to agree."""
    start = random_start(model, local)
    batched = personalise(model, local, start, settings, seed=7)
    loop = personalise_one_by_one(model, local, start, settings, seed=7)
    assert (batched.metapatch - start).abs().max() > 1e-3  # it trained
    assert (batched.metapatch - loop.metapatch).abs().max() < 1e-5
    assert torch.equal(batched.adopted, loop.adopted)
    return batched, loop


@pytest.mark.parametrize("protocol", ["incremental", "static"])
@pytest.mark.parametrize("valid_size,l2,select", [(1, 0.0, "best"), (0, 0.1, "best"), (2, 0.0, "last")])
def test_batched_device_phase_equals_per_user_loop(tiny_config, protocol, valid_size, l2, select):
    settings_dict = {**tiny_config, "device_valid_size": valid_size, "device_l2": l2, "device_chunk_size": 7,
                     "device_select": select}
    _, model, local, settings = local_setup(settings_dict, protocol)
    batched, loop = batched_and_loop(model, local, settings)
    assert torch.allclose(batched.train_loss, loop.train_loss, atol=1e-5, equal_nan=True)
    assert batched.train_loss.isfinite().any()
    if valid_size:
        assert 0 < int(batched.adopted.sum()) < len(local.users)  # the guard keeps some cloud models
        assert torch.allclose(batched.valid_loss_device, loop.valid_loss_device, atol=1e-5)
        assert torch.all(batched.valid_loss_device <= batched.valid_loss_cloud)


def test_a_device_trained_alone_by_the_batched_code_equals_the_loop_bit_for_bit(tiny_config):
    # Both run the whole model (no site cache), so any difference is in how the device's gradient is formed. With
    # 16 metapatch numbers and minibatches of 16 rows, expand's backward (a vectorised sum over the rows) and a
    # gather's (accumulated row by row) round differently.
    settings_dict = {**tiny_config, "device_cache_mb": 0, "device_batch_size": 16, "metapatch_dim": 16}
    _, model, local, settings = local_setup(settings_dict, "static")
    start = random_start(model, local)
    rows_per_device = torch.bincount(local.owner[~local.is_valid])
    device = int(rows_per_device.argmax())
    assert rows_per_device[device] > settings.batch_size  # several minibatches of several rows
    alone, _ = local.subset(torch.tensor([device]))
    batched = personalise(model, alone, start[[device]], settings, seed=3)
    loop = personalise_one_by_one(model, local, start, settings, seed=3, devices=[device])
    assert torch.equal(batched.metapatch, loop.metapatch)


@pytest.mark.parametrize(
    "patch_sites,cache_bytes",
    [(None, 0), (None, 16 * 20), (["backbone.item_embedding"], 8 * 16 * 20), (["backbone.item_embedding"], 0)],
    ids=["no cache", "backbone cached, devices in groups", "deep site cached, in groups", "deep site, no cache"],
)
def test_site_cache_and_groups_never_change_results(tiny_config, patch_sites, cache_bytes):
    _, model, local, settings = local_setup({**tiny_config, "patch_sites": patch_sites, "device_chunk_size": 5})
    settings = dataclasses.replace(settings, cache_bytes=cache_bytes)  # 4-byte floats: a few rows per group
    start = random_start(model, local)
    batched = personalise(model, local, start, settings, seed=5)
    loop = personalise_one_by_one(model, local, start, settings, seed=5)
    assert (batched.metapatch - start).abs().max() > 1e-3
    assert (batched.metapatch - loop.metapatch).abs().max() < 1e-5
    assert torch.equal(batched.adopted, loop.adopted)


def test_lowest_site_is_found_and_cached(tiny_config):
    _, model, local, _ = local_setup({**tiny_config, "patch_sites": ["backbone", "backbone.item_embedding"]})
    cache, why_not = SiteCache.probe(model, local.interaction)
    assert why_not is None and cache.site == "backbone.item_embedding"  # returns before the backbone does
    outputs = cache.outputs(model, local.interaction, chunk_size=7)["backbone.item_embedding"]
    items = local.interaction[model.backbone.ITEM_SEQ]
    assert torch.equal(outputs, model.backbone.item_embedding.weight[items])


def test_a_site_that_runs_twice_per_forward_pass_is_not_cached():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)
            self.context = PatchContext()
            wrap_site("layer", self.layer, lambda output, metapatch: output, self.context)

        def forward(self, rows):
            return self.layer(self.layer(rows))

    cache, why_not = SiteCache.probe(Twice(), torch.randn(6, 3))
    assert cache is None and why_not == "the lowest patch site [layer] runs 2 times per forward pass"


def test_the_cache_pass_computes_nothing_above_the_site():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.above = torch.nn.Linear(3, 3), 0
            self.context = PatchContext()
            wrap_site("layer", self.layer, lambda output, metapatch: output, self.context)

        def forward(self, rows):
            output = self.layer(rows)
            self.above += 1
            return 2 * output

    model, rows = Counting(), torch.randn(10, 3)
    cache, _ = SiteCache.probe(model, rows)
    model.above = 0
    outputs = cache.outputs(model, rows, chunk_size=4)["layer"]
    assert model.above == 0 and torch.allclose(outputs, model.layer(rows))


def test_a_device_learns_from_its_own_data_only(tiny_config):
    _, model, local, settings = local_setup({**tiny_config, "device_valid_size": 0})
    start = torch.zeros(len(local.users), model.metapatch.shape[1])
    before = personalise(model, local, start, settings, seed=3).metapatch
    # Change device 0's local data: its metapatch changes, no other device's does.
    mine = torch.nonzero(local.owner == 0).squeeze(1)
    target = model.objective.target_field
    local.interaction[target][mine] = (local.interaction[target][mine] % (model.backbone.n_items - 1)) + 1
    after = personalise(model, local, start, settings, seed=3).metapatch
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[1:], before[1:])


def test_device_phase_leaves_shared_parameters_alone(tiny_config):
    _, model, local, settings = local_setup(tiny_config)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    personalise(model, local, torch.zeros(len(local.users), model.metapatch.shape[1]), settings, seed=1)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in state.items())
    assert all(param.requires_grad for param in model.parameters())


def test_a_share_of_the_users_trains_as_it_does_among_all(tiny_config):
    """What each rank of a distributed run does: its share of the users gets the metapatches one process gives them."""
    config, (train_data, _, _), model, _ = build(tiny_config)
    schedule = RoundSchedule(config, train_data)
    rows = schedule.training_rows(schedule.device_rows(1), 1)
    settings = device_settings(config)
    everyone = LocalData.from_rows(rows, settings.valid_size, config["device"])
    start = torch.zeros(len(everyone.users), model.metapatch.shape[1])
    together = personalise(model, everyone, start, settings, seed=3)
    shares = [LocalData.from_rows(rows, settings.valid_size, config["device"], share=(index, 3))
              for index in range(3)]
    assert torch.equal(torch.sort(torch.cat([share.users for share in shares])).values, everyone.users)
    for share in shares:
        alone = personalise(model, share, start[: len(share.users)], settings, seed=3)
        position = torch.searchsorted(everyone.users, share.users)
        assert torch.equal(alone.metapatch, together.metapatch[position])
        assert torch.equal(alone.adopted, together.adopted[position])


def test_a_devices_gradient_adds_its_rows_in_one_order_whatever_the_threads():
    """The size of ml-100k's first device step: 3,772 rows of 943 devices' metapatches (k = 16), here in random
    order. Indexing (``table[owner]``) added the rows' gradients with atomic adds on two threads, in an order that
    changed from call to call."""
    generator = torch.Generator().manual_seed(0)
    owner = torch.randint(0, 943, (3772,), generator=generator)
    upstream = torch.randn(3772, 16, generator=generator)

    def gradient(threads):
        torch.set_num_threads(threads)
        table = torch.zeros(943, 16, requires_grad=True)
        (gather_rows(table, owner) * upstream).sum().backward()
        return table.grad

    threads = torch.get_num_threads()
    try:
        first = gradient(2)
        assert all(torch.equal(gradient(2), first) for _ in range(10))
        assert torch.equal(gradient(1), first)
    finally:
        torch.set_num_threads(threads)
