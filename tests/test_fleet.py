"""A realistic fleet (recbole_dccl/fleet.py): which devices train and upload, what the cloud receives, the privacy
account, and the refusal of bad values."""

import os

import numpy as np
import pytest
import torch

from dccl_device.upload import decode, encode, int8_error_bound, upload_bytes
from recbole_dccl.errors import InputError
from recbole_dccl.fleet import FleetSettings, PrivacyAccount, RoundFleet
from recbole_dccl.rounds import RoundSchedule
from tests.helpers import build

WHOLE = FleetSettings(1.0, 0.0, False, "float32", None, 0.0, 1e-5)
# A fleet that samples devices, loses uploads, and noises and encodes what arrives: all of it drawn from the seed and
# the round, so the same on any number of processes and across a resume (test_distributed, test_resume).
REALISTIC_FLEET = {"device_participation": 0.5, "device_dropout": 0.3, "upload_dtype": "int8", "dp_clip": 0.5,
                   "dp_noise_multiplier": 1.0}


def fleet_settings(**changes):
    return FleetSettings(**{**WHOLE.__dict__, **changes})


def test_upload_formats_round_trip_within_their_bounds():
    vectors = np.random.default_rng(0).normal(0, 0.3, (50, 64)).astype(np.float32)
    vectors[3] = 0  # a device that kept the cloud model
    vectors[4, 7] = 5.0  # one large value: the rest of its vector shares its scale
    assert np.array_equal(decode(encode(vectors, "float32")), vectors)
    assert np.allclose(decode(encode(vectors, "float16")), vectors, rtol=1e-3, atol=1e-4)
    payload = encode(vectors, "int8")
    assert payload["values"].dtype == np.int8 and payload["scale"].dtype == np.float32
    error = np.abs(decode(payload) - vectors).max(axis=1)
    assert np.all(error <= int8_error_bound(vectors) * (1 + 1e-6))
    assert np.array_equal(decode(payload)[3], np.zeros(64, np.float32))
    assert [upload_bytes(64, dtype) for dtype in ("float32", "float16", "int8")] == [256, 128, 68]
    with pytest.raises(ValueError, match="upload_dtype.*int4"):
        encode(vectors, "int4")


def test_the_fleet_of_a_round_is_drawn_from_the_seed_and_the_round_alone():
    settings = fleet_settings(participation=0.5, dropout=0.3)
    first, again = RoundFleet(settings, 2001, 7, 1), RoundFleet(settings, 2001, 7, 1)
    assert torch.equal(first.sampled, again.sampled) and torch.equal(first.uploaded, again.uploaded)
    assert not torch.equal(first.sampled, RoundFleet(settings, 2001, 7, 2).sampled)
    assert not torch.equal(first.sampled, RoundFleet(settings, 2001, 8, 1).sampled)
    assert not first.sampled[0]  # RecBole's padding user
    assert torch.all(first.sampled | ~first.uploaded)  # only a sampled device uploads
    assert 0.45 < first.sampled.float().mean() < 0.55
    assert 0.6 < first.uploaded.sum() / first.sampled.sum() < 0.8
    whole = RoundFleet(WHOLE, 2001, 7, 1)
    assert whole.sampled[1:].all() and torch.equal(whole.sampled, whole.uploaded) and whole.teaching is None
    assert torch.equal(first.teaching, first.uploaded)
    assert RoundFleet(fleet_settings(participation=0.5, stale_teachers=True), 2001, 7, 1).teaching is None


def test_what_the_cloud_receives_is_clipped_noised_and_encoded():
    users = torch.tensor([1, 5, 9])
    start = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    new = start + torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(RoundFleet(WHOLE, 10, 0, 1).receive(users, new, start), new)
    clipped = RoundFleet(fleet_settings(dp_clip=0.5), 10, 0, 1).receive(users, new, start)
    assert torch.allclose((clipped - start).norm(dim=1), torch.full((3,), 0.5), atol=1e-6)
    noisy = RoundFleet(fleet_settings(dp_clip=0.5, dp_noise_multiplier=2.0), 10, 0, 1)
    received = noisy.receive(users, new, start)
    assert torch.equal(received, noisy.receive(users, new, start))  # the seed and the round fix the noise
    assert not torch.allclose(received, clipped)
    # A user's noise does not depend on which other users upload with it (nor on the rank that holds it).
    assert torch.equal(noisy.receive(users[1:], new[1:], start[1:]), received[1:])
    int8 = RoundFleet(fleet_settings(upload_dtype="int8"), 10, 0, 1).receive(users, new, start)
    assert torch.all((int8 - new).abs().max(dim=1).values <= torch.from_numpy(int8_error_bound(new.numpy())) + 1e-7)


def test_the_reported_epsilon_is_opacus_own():
    from opacus.accountants import RDPAccountant

    settings = fleet_settings(participation=0.1, dp_clip=1.0, dp_noise_multiplier=1.1, dp_delta=1e-5)
    accountant = RDPAccountant()
    for _ in range(3):
        accountant.step(noise_multiplier=1.1, sample_rate=0.1)
    assert PrivacyAccount(settings).epsilon(3) == accountant.get_epsilon(delta=1e-5)
    assert PrivacyAccount(settings).epsilon(1) < PrivacyAccount(settings).epsilon(3)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("device_participation", 0, r"a number in \(0, 1\]"),
        ("device_participation", 1.5, r"a number in \(0, 1\]"),
        ("device_dropout", 1.0, r"a number in \[0, 1\)"),
        ("dp_clip", -1.0, "None or a number > 0"),
        ("dp_noise_multiplier", -0.1, "a number >= 0"),
        ("dp_delta", 0, r"a number in \(0, 1\)"),
        ("upload_dtype", "int4", "one of"),
        ("stale_teachers", "yes", "True or False"),
    ],
)
def test_bad_fleet_values_are_refused_before_training(tiny_config, key, value, message):
    with pytest.raises(InputError, match=rf"{key}: .*{message}"):
        build({**tiny_config, key: value})


def test_noise_without_a_clip_is_refused(tiny_config):
    with pytest.raises(InputError, match="dp_noise_multiplier.*needs dp_clip"):
        build({**tiny_config, "dp_noise_multiplier": 1.0})


def device_round(settings):
    """Round 1's device phase of a tiny run with ``settings``, every device starting from a metapatch of its own:
    ``(model, the metapatches before, the round's fleet)``."""
    config, (train_data, _, _), model, trainer = build(settings)
    schedule = RoundSchedule(config, train_data)
    with torch.no_grad():
        model.metapatch.normal_(0, 0.1)  # as the encoder left them after an earlier round
        model.uploaded_metapatch.copy_(model.metapatch)
    before = model.metapatch.clone()
    trainer.start_round(schedule, 1)
    trainer.device_phase(1, schedule.training_rows(schedule.local_rows(1), 1))
    return model, before, trainer.round.fleet


def test_sampled_devices_train_dropped_uploads_never_reach_the_cloud(tiny_config):
    settings = {**tiny_config, "device_participation": 0.6, "device_dropout": 0.4, "device_valid_size": 0}
    model, before, fleet = device_round(settings)
    changed = (model.metapatch != before).any(dim=1)
    received = (model.uploaded_metapatch != before).any(dim=1)
    assert torch.equal(changed, fleet.sampled)  # without the guard every sampled device keeps what it trained
    assert torch.equal(received, fleet.uploaded)
    dropped = fleet.sampled & ~fleet.uploaded
    assert dropped.any() and (~fleet.sampled[1:]).any()
    assert torch.equal(model.uploaded_metapatch[fleet.uploaded], model.metapatch[fleet.uploaded])


def test_a_fleet_that_samples_every_device_trains_as_the_whole_fleet(tiny_config):
    whole, _, _ = device_round({**tiny_config, "device_valid_size": 0})
    sampled, _, fleet = device_round({**tiny_config, "device_valid_size": 0, "device_participation": 0.999999})
    assert fleet.sampled[1:].all()
    assert torch.equal(whole.metapatch, sampled.metapatch)


def test_an_availability_trace_decides_who_may_take_part(tiny_config, tmp_path):
    trace = tmp_path / "online.tsv"
    # users 1-10 online in round 1, users 5-30 in round 2; "ghost" is not in the dataset (RecBole filtered it out)
    lines = [f"{user}\t1" for user in range(1, 5)] + [f"{user}\t1 2" for user in range(5, 11)]
    lines += [f"{user}\t2" for user in range(11, 31)] + ["ghost\t1"]
    trace.write_text("user_id:token\trounds:token_seq\n" + "\n".join(lines) + "\n")
    settings = {**tiny_config, "rounds": 2, "device_availability": str(trace), "device_participation": 0.8}
    config, (train_data, _, _), model, trainer = build(settings)
    schedule = RoundSchedule(config, train_data)
    dataset = train_data.dataset
    for round_idx, users in ((1, range(1, 11)), (2, range(5, 31))):
        online = torch.zeros(dataset.user_num, dtype=torch.bool)
        online[dataset.token2id(dataset.uid_field, [str(user) for user in users])] = True
        assert torch.equal(schedule.online[round_idx], online)
        trainer.start_round(schedule, round_idx)
        fleet = trainer.round.fleet
        assert not fleet.whole and not (fleet.sampled & ~online).any() and fleet.sampled.sum() > 0.5 * len(users)


@pytest.mark.parametrize("line", ["u1\t0", "u1\t3", "u1\tfirst", "u1"])
def test_a_malformed_trace_is_refused_before_training(tiny_config, tmp_path, line):
    trace = tmp_path / "online.tsv"
    trace.write_text(f"user_id:token\trounds:token_seq\n{line}\n")
    config, (train_data, _, _), _, _ = build({**tiny_config, "rounds": 2, "device_availability": str(trace)})
    with pytest.raises(InputError, match=r"device_availability: .*line 2"):
        RoundSchedule(config, train_data)
    with pytest.raises(InputError, match="device_availability: .*existing trace file"):
        build({**tiny_config, "device_availability": str(tmp_path / "missing.tsv")})


def test_asking_for_noise_leaves_recboles_log_as_it_is(tiny_config, tmp_path):
    """Opacus calls logging.basicConfig when imported: validating a DP run must not import it before RecBole's
    logger is set up (it did, and a DP run's log lost every INFO line). In a process of its own: pytest's has
    imported Opacus already."""
    import subprocess
    import sys

    script = ("import sys, logging; from tests.helpers import build; "
              f"build({{**{tiny_config!r}, 'dp_clip': 1.0, 'dp_noise_multiplier': 1.0}}); "
              "print('opacus' in sys.modules, logging.getLogger().handlers)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("False") and "FileHandler" in done.stdout  # RecBole's own log file is set up
