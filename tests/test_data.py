import numpy as np

from recbole_dccl.rounds import RoundSchedule, positions_from_newest
from tests.helpers import build


def test_positions_from_newest():
    users = np.array([1, 1, 1, 2, 2, 3])
    assert positions_from_newest(users).tolist() == [2, 1, 0, 1, 0, 0]


def test_incremental_schedule_holds_out_newest_blocks(tiny_config):
    config, (train_data, _, _), _, _ = build({**tiny_config, "rounds": 2, "fresh_interactions": 3})
    schedule = RoundSchedule(config, train_data)
    users = train_data.dataset.inter_feat["user_id"].numpy()
    from_newest = positions_from_newest(users)
    assert set(from_newest[schedule.device_rows(2)]) == {0, 1, 2}
    assert set(from_newest[schedule.device_rows(1)]) == {3, 4, 5}
    assert from_newest[schedule.cloud_rows()].min() == 6
    covered = np.concatenate([schedule.cloud_rows(), schedule.device_rows(1), schedule.device_rows(2)])
    assert sorted(covered) == list(range(len(users)))
    assert np.all(np.isin(np.unique(users), users[schedule.cloud_rows()]))  # every user keeps round-0 data


def test_static_schedule_shares_all_rows(tiny_config):
    config, (train_data, _, _), _, _ = build({**tiny_config, "protocol": "static"})
    schedule = RoundSchedule(config, train_data)
    assert len(schedule.cloud_rows()) == len(schedule.device_rows(1)) == len(train_data.dataset)


def test_device_data_chooses_what_a_device_trains_on(tiny_config):
    settings = {**tiny_config, "rounds": 2, "fresh_interactions": 3, "cold_start_ratio": 0.2}
    config, (train_data, _, _), _, _ = build({**settings, "device_data": "fresh"})
    fresh = RoundSchedule(config, train_data)
    config, (train_data, _, _), _, _ = build({**settings, "device_data": "all"})
    every = RoundSchedule(config, train_data)
    assert np.array_equal(fresh.local_rows(2), fresh.device_rows(2))
    # all: round 0's and every round's rows so far, of the users who take part (not the cold ones)
    expected = np.concatenate([every.cloud_rows(), every.device_rows(1), every.device_rows(2)])
    assert np.array_equal(every.local_rows(2), np.sort(expected))
    assert np.array_equal(every.local_rows(1), np.sort(np.concatenate([every.cloud_rows(), every.device_rows(1)])))
    assert not np.isin(every.local_rows(2), every.cold_rows()).any()
