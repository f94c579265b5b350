import numpy as np
import pytest
import torch

from recbole_dccl.quick_start import run_recbole_dccl
from recbole_dccl.rounds import RoundSchedule, TrainingRows, cold_start_users
from tests.helpers import build


def test_cold_users_are_drawn_from_the_seed():
    users = np.arange(1, 101)
    assert np.array_equal(cold_start_users(users, 0.2, seed=1), cold_start_users(users, 0.2, seed=1))
    assert not np.array_equal(cold_start_users(users, 0.2, seed=1), cold_start_users(users, 0.2, seed=2))
    assert len(cold_start_users(users, 0.2, seed=1)) == 20
    assert len(cold_start_users(users, 0.001, seed=1)) == 1  # a ratio above 0 holds out someone
    assert len(cold_start_users(users, 0.0, seed=1)) == 0


@pytest.mark.parametrize("protocol", ["incremental", "static"])
def test_cold_users_rows_reach_neither_the_cloud_nor_the_rounds(tiny_config, protocol):
    config, (train_data, _, _), _, _ = build({**tiny_config, "protocol": protocol, "cold_start_ratio": 0.2, "rounds": 2})
    schedule = RoundSchedule(config, train_data)
    users = train_data.dataset.inter_feat["user_id"].numpy()
    cold = schedule.cold_users
    assert len(cold) == 6
    trained = np.concatenate([schedule.cloud_rows(), schedule.device_rows(1), schedule.device_rows(2)])
    assert not np.isin(users[trained], cold).any()
    assert np.array_equal(np.sort(schedule.cold_rows()), np.flatnonzero(np.isin(users, cold)))  # all their rows


def test_cold_start_run_reports_the_cold_group(tiny_config, tmp_path, monkeypatch):
    seen = []
    loader, round_loader = RoundSchedule.loader, TrainingRows.loader

    def recording_loader(self, rows, shuffle=True):
        seen.append(self.dataset.inter_feat["user_id"].numpy()[rows])
        return loader(self, rows, shuffle)

    def recording_round_loader(self, config, shuffle=True):
        seen.append(self.dataset.inter_feat["user_id"].numpy())
        return round_loader(self, config, shuffle)

    monkeypatch.setattr(RoundSchedule, "loader", recording_loader)
    monkeypatch.setattr(TrainingRows, "loader", recording_round_loader)
    cloud = str(tmp_path / "cloud.pth")
    settings = {**tiny_config, "cold_start_ratio": 0.2, "cloud_checkpoint": cloud}
    result = run_recbole_dccl(model="DCCL", dataset="tiny", config_dict=settings, verbose=False)

    config, (train_data, _, _), _, _ = build(settings)
    cold = RoundSchedule(config, train_data).cold_users
    assert len(seen) == 2  # round 0 and the round's MoMoDistill/step-2 data: every row the cloud trains on
    assert not np.isin(np.concatenate(seen), cold).any()
    report = result["cold_start"]
    assert report["users"] == len(cold)
    assert list(report) == ["users", "cloud_only", "zero", "zero_finetuned", "encoder", "encoder_finetuned"]
    for name in list(report)[1:]:
        assert 0 <= report[name]["test"]["ndcg@10"] <= 1
    assert report["cloud_only"]["test"] == {k: v for k, v in result["cloud_only"]["test_groups"]["cold"].items() if k != "users"}
    assert result["dccl_device"]["test_groups"]["cold"]["users"] == len(cold)
    # A cloud model trained with other cold users is refused, also from a file that predates the key (ratio 0).
    with pytest.raises(ValueError, match="cloud_checkpoint: .*'cold_start_ratio': \\(0.2, 0.0\\)"):
        run_recbole_dccl(model="DCCL", dataset="tiny", config_dict={**settings, "cold_start_ratio": 0.0}, verbose=False)
    checkpoint = torch.load(cloud, weights_only=True)
    del checkpoint["identity"]["cold_start_ratio"]
    torch.save(checkpoint, cloud)
    with pytest.raises(ValueError, match="cloud_checkpoint: .*'cold_start_ratio': \\(0.0, 0.2\\)"):
        run_recbole_dccl(model="DCCL", dataset="tiny", config_dict=settings, verbose=False)
