"""benchmarks/quality.py: its report on hand-made result files (paired gains, intervals, tables and plots), and how
it runs and resumes a cell."""

import glob
import json
import os

import numpy as np
import pytest

from benchmarks import matrix, quality
from recbole_dccl.defaults import dccl_defaults
from recbole_dccl.files import read_result_file, write_result_file

USERS = list(range(1, 41))
GROUPS = {"G1 [1, 5]": USERS[:20], "G2 [6, 9]": USERS[20:]}


def view(values):
    """One view's results with per-user test values ``values`` (for ndcg@10 and hit@10 alike)."""
    values = np.asarray(values, dtype=float)
    metrics = lambda v: {"ndcg@10": float(v.mean()), "hit@10": float(v.mean())}
    return {
        "valid": metrics(values),
        "test": metrics(values),
        "test_groups": {name: {"users": len(m), **metrics(values[np.asarray(m) - 1])} for name, m in GROUPS.items()},
        "test_users": {"users": USERS, "ndcg@10": values.tolist(), "hit@10": values.tolist()},
    }


def cell(cloud_only, cloud, device, device_method="metapatch", deployed_cloud=None):
    history = [{"round": 0, "phase": "cloud", "cloud": cloud_only, "device": cloud_only},
               {"round": 1, "phase": "momodistill", "cloud": cloud, "device": device}]
    return {"cloud_only": cloud_only, "dccl_cloud": cloud, "dccl_device": device, "deployed_cloud": deployed_cloud or cloud,
            "deployed_device": device, "history": history, "user_groups": GROUPS,
            "config": {**dccl_defaults(), "device_method": device_method}}


def plain_cell(values):
    """A plain model's result file (a baseline run through run_recbole_dccl.py)."""
    reading = view(values)
    return {"best_valid_result": reading["valid"], "test_result": reading["test"],
            "test_groups": reading["test_groups"], "test_users": reading["test_users"], "user_groups": GROUPS}


@pytest.fixture
def cells(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "cells")
    for seed in (2020, 2021):
        base = rng.uniform(0.1, 0.5, len(USERS))
        tail_boost = np.where(np.arange(len(USERS)) < 20, 1.5, 1.0)  # devices help G1 only, by 50%
        cells = {
            "dccl": cell(view(base), view(base), view(base * tail_boost)),
            "data": cell(view(base), view(base * 0.9), view(base * 0.9), device_method="none", deployed_cloud=view(base * 0.8)),
            "frequency": plain_cell(base * 2),
        }
        for name, content in cells.items():
            write_result_file(quality.cell_path(str(tmp_path), name, seed), content)
    return str(tmp_path)


def test_paired_gain_and_interval(cells):
    summary = quality.summarise(quality.load_cells(cells, ["dccl", "data"], [2020, 2021]), ["dccl", "data"], [2020, 2021])
    rows = summary["rows"]
    assert list(rows) == ["cloud-only", "dccl cloud", "dccl cloud deployed", "dccl device", "dccl device deployed",
                          "data cloud", "data cloud deployed"]
    assert rows["cloud-only"]["paired_gain"]["ndcg@10"] == {"gain": 0.0, "ci95": [0.0, 0.0]}
    assert rows["data cloud"]["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(-0.1)
    assert rows["data cloud"]["paired_gain"]["ndcg@10"]["ci95"] == pytest.approx([-0.1, -0.1])
    tail = rows["dccl device"]["groups"]["G1 [1, 5]"]["paired_gain"]["ndcg@10"]
    assert tail["gain"] == pytest.approx(0.5) and tail["ci95"] == pytest.approx([0.5, 0.5])
    assert rows["dccl device"]["groups"]["G2 [6, 9]"]["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(0.0)
    overall = rows["dccl device"]["paired_gain"]["ndcg@10"]
    assert 0.0 < overall["ci95"][0] < overall["gain"] < overall["ci95"][1] < 0.5  # users differ: a real interval
    versus_data = rows["dccl cloud"]["paired_gain_vs_data"]["all"]["ndcg@10"]
    assert versus_data["gain"] == pytest.approx(1 / 0.9 - 1)
    deployed_versus_data = rows["dccl cloud deployed"]["paired_gain_vs_data"]["all"]["ndcg@10"]
    assert deployed_versus_data["gain"] == pytest.approx(1 / 0.8 - 1)  # against data's deployed model, not its selected one
    assert "paired_gain_vs_data" not in rows["data cloud"] and "paired_gain_vs_data" not in rows["data cloud deployed"]
    assert summary["rounds"]["dccl"]["phases"] == ["0:cloud", "1:momodistill"]
    device = rows["dccl device"]["test"]["ndcg@10"]["mean"]
    assert summary["by_rounds"]["dccl"][1]["device"] == {"selected": pytest.approx(device), "deployed": pytest.approx(device)}


def test_plain_baselines_are_rows_of_their_own(cells):
    variants = ["dccl", "data", "frequency"]
    summary = quality.summarise(quality.load_cells(cells, variants, [2020, 2021]), variants, [2020, 2021])
    row = summary["rows"]["frequency"]
    assert row["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(1.0)
    assert row["paired_gain_vs_data"]["all"]["ndcg@10"]["gain"] == pytest.approx(2 / 0.9 - 1)
    assert "frequency" not in summary["rounds"] and "| frequency |" in quality.markdown(summary)


def test_report_files(cells):
    table = quality.write_report(cells, ["dccl", "data"], [2020, 2021])
    assert "| dccl device |" in table and "G1 [1, 5]" in table and "+50.0% [+50.0, +50.0]" in table
    for name in ("summary.json", "summary.md", "groups.png", "rounds.png"):
        assert os.path.getsize(os.path.join(cells, name)) > 0


def test_results_matrix_reads_the_summaries(cells):
    quality.write_report(cells, ["dccl", "data", "frequency"], [2020, 2021])
    with open(os.path.join(cells, "summary.json")) as file:
        summary = json.load(file)
    tables = matrix.matrix({"toy": summary}, metric="hit@10")
    assert "**Test hit@10, mean over seeds" in tables
    assert "| Frequency (user's own items) | " in tables and "(+100.0% [+100.0, +100.0])" in tables
    assert "| DCCL (defaults), device, selected | " in tables and "v1 defaults" not in tables  # no such variant: no row
    assert "| data, cloud, deployed | " in matrix.matrix({"toy": summary}, also=["data"], metric="hit@10")
    least_active = tables.split("**Least-active fifth")[1].split("**Paired gain")[0]
    assert "(+50.0% [+50.0, +50.0])" in least_active  # dccl device on G1, the first group


def name_types(cells, type_of):
    """Give every reading of every cell each user's target type ``type_of(user)``."""
    for path in sorted(glob.glob(os.path.join(cells, "cells", "*" + quality.CELL_SUFFIX))):
        cell = read_result_file(path)
        for reading in [cell, *(value for value in cell.values() if isinstance(value, dict) and "test_users" in value)]:
            if "test_users" in reading:
                reading["test_users"]["type"] = [type_of(user) for user in USERS]
        write_result_file(path, cell)


def test_rows_by_target_type_where_the_cells_name_each_users_type(cells):
    """Users 1-20 (whom the devices help by 50%) have repeat targets, the others explore ones."""
    name_types(cells, lambda user: "repeat" if user <= 20 else "explore")
    variants = ["dccl", "data", "frequency"]
    table = quality.write_report(cells, variants, [2020, 2021])
    with open(os.path.join(cells, "summary.json")) as file:
        summary = json.load(file)
    assert summary["types"] == {"repeat": [20, 20], "explore": [20, 20]}
    device = summary["rows"]["dccl device"]["types"]
    assert device["repeat"]["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(0.5)
    assert device["explore"]["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(0.0)
    assert summary["rows"]["frequency"]["types"]["explore"]["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(1.0)
    cloud_only = summary["rows"]["cloud-only"]
    by_hand = np.mean([cells_values(cells, "dccl", 2020)[user - 1] for user in USERS[:20]])
    assert cloud_only["types"]["repeat"]["test"]["ndcg@10"]["mean"] == pytest.approx(
        np.mean([by_hand, np.mean([cells_values(cells, "dccl", 2021)[user - 1] for user in USERS[:20]])]))
    assert "by target type" in table and os.path.getsize(os.path.join(cells, "types.png")) > 0
    tables = matrix.matrix({"toy": summary}, metric="ndcg@10")
    assert "**Repeat targets: test ndcg@10" in tables and "**Explore targets: test ndcg@10" in tables


def test_every_row_against_a_named_row_overall_least_active_and_by_type(cells):
    """``--versus``: the device helps users 1-20 (repeat targets, the least active group) by 50%; Frequency doubles
    everyone."""
    name_types(cells, lambda user: "repeat" if user <= 20 else "explore")
    variants = ["dccl", "data", "frequency"]
    table = quality.write_report(cells, variants, [2020, 2021], versus=["frequency", "dccl cloud"])
    with open(os.path.join(cells, "summary.json")) as file:
        versus = json.load(file)["versus"]
    device = versus["dccl cloud"]["dccl device"]
    assert device["least_active_group"]["ndcg@10"]["gain"] == pytest.approx(0.5)
    assert device["repeat"]["ndcg@10"]["gain"] == pytest.approx(0.5)
    assert device["explore"]["ndcg@10"]["gain"] == pytest.approx(0.0)
    assert versus["frequency"]["cloud-only"]["all"]["ndcg@10"]["gain"] == pytest.approx(-0.5)
    assert "frequency" not in versus["frequency"] and "gain vs `dccl cloud`" in table


def test_a_type_without_targets_has_no_rows(cells):
    """ml-100k: nobody returns to a movie, so every target is an explore one."""
    name_types(cells, lambda user: "explore")
    table = quality.write_report(cells, ["dccl", "data"], [2020, 2021])
    with open(os.path.join(cells, "summary.json")) as file:
        summary = json.load(file)
    assert summary["types"]["repeat"] == [0, 0] and list(summary["rows"]["dccl device"]["types"]) == ["explore"]
    assert "| dccl device | — | " in table


def cells_values(cells, variant, seed):
    """The per-user test NDCG@10 of ``variant``'s cloud-only model in seed ``seed``."""
    return read_result_file(quality.cell_path(cells, variant, seed))["cloud_only"]["test_users"]["ndcg@10"]


def test_the_dccl_variant_is_the_shipped_defaults_in_every_committed_folder():
    """``dccl`` means the YAML defaults, in quality.py and in every committed folder's cells; ``v2`` and ``v1`` mean
    the earlier defaults there. A change of a default without running its folders again fails here."""
    method_defaults = {key: value for key, value in dccl_defaults().items() if key not in quality.BENCHMARK_KEYS}
    expected = {name: {**method_defaults, **quality.VARIANTS[name]} for name in ("dccl", "v2", "v1")}
    # Keys added after a folder's cells were run, at the value that runs as the code did before them.
    predated = {"device_memory": False, "memory_gate": False, "device_participation": 1.0, "device_dropout": 0.0, "device_availability": None,
                "stale_teachers": False, "upload_dtype": "float32", "dp_clip": None, "dp_noise_multiplier": 0.0,
                "dp_delta": 1e-5}
    assert quality.VARIANTS["dccl"] == {}
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")
    folders = sorted(glob.glob(os.path.join(root, "*", "summary.json")))
    assert len(folders) >= 13
    for path in folders:
        with open(path) as file:
            settings = json.load(file)["settings"]
        assert {"dccl", "v2", "v1"} & set(settings), path
        for name in ("dccl", "v2", "v1"):
            if name in settings:
                assert {**predated, **settings[name]} == expected[name], (path, name)


def test_reported_metrics_by_kind_of_evaluation():
    full_sort = {"recall@10": 0.3, "ndcg@10": 0.2, "hit@10": 0.3}
    sampled = {**full_sort, "gauc": 0.8, "sampled_auc": 0.8, "sampled_logloss": 0.1}
    labeled = {"auc": 0.7, "logloss": 0.6, "gauc": 0.65}
    assert quality.reported_metrics(full_sort) == ["ndcg@10", "hit@10"]
    assert quality.reported_metrics(sampled) == ["ndcg@10", "hit@10", "gauc"]
    assert quality.reported_metrics(labeled) == ["auc", "logloss", "gauc"]


def test_a_baseline_counting_rows_differently_is_matched_by_its_groups_users(cells):
    """A sequential baseline beside a CTR backbone names the same users' groups by other row counts."""
    for seed in (2020, 2021):
        path = quality.cell_path(cells, "frequency", seed)
        plain = read_result_file(path)
        renamed = {"G1 [1, 5]": "G1 [0, 4]", "G2 [6, 9]": "G2 [5, 8]"}
        plain["user_groups"] = {renamed[name]: users for name, users in plain["user_groups"].items()}
        plain["test_groups"] = {renamed[name]: values for name, values in plain["test_groups"].items()}
        write_result_file(path, plain)
    variants = ["dccl", "data", "frequency"]
    summary = quality.summarise(quality.load_cells(cells, variants, [2020, 2021]), variants, [2020, 2021])
    assert summary["rows"]["frequency"]["groups"]["G1 [1, 5]"]["paired_gain"]["ndcg@10"]["gain"] == pytest.approx(1.0)


def test_a_cell_cut_mid_run_is_resumed_from_its_run_state(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(quality.subprocess, "call", lambda command, **kwargs: commands.append(command) or 0)
    declared = {**quality.DECLARED, "dataset": "tiny"}
    for folder in ("cells", "logs"):
        (tmp_path / folder).mkdir()
    quality.run_cell(str(tmp_path), declared, "dccl", {}, 2020)
    cut = tmp_path / "saved" / "dccl-seed2021"
    cut.mkdir(parents=True)
    (cut / "DCCL-Nov-29-2026_10-00-00-run.pth").write_bytes(b"")
    quality.run_cell(str(tmp_path), declared, "dccl", {}, 2021)
    fresh, resumed = commands
    assert not [arg for arg in fresh if arg.startswith("--resume=")]
    assert f"--resume={cut}" in resumed


def test_a_cell_from_another_round_0_model_is_refused(cells, monkeypatch):
    """A seed's cells pair their gains with one round-0 model; a cell whose round 0 was trained again differently
    (its checkpoint lost, another thread count) is refused when it is written and when a summary reads it."""
    other_round0 = read_result_file(quality.cell_path(cells, "dccl", 2020))
    other_round0["cloud_only"] = view(np.full(len(USERS), 0.3))

    def run(command, **kwargs):
        result = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--result_file="))
        write_result_file(result, other_round0)
        return 0

    monkeypatch.setattr(quality.subprocess, "call", run)
    declared = {**quality.DECLARED, "dataset": "tiny"}
    os.makedirs(os.path.join(cells, "logs"))
    with pytest.raises(ValueError, match="seed 2020: the cells data and late started from different round-0 models"):
        quality.run_cell(cells, declared, "late", {}, 2020)
    with pytest.raises(ValueError, match="different round-0 models"):
        quality.write_report(cells, ["dccl", "data", "late"], [2020])


def test_a_folder_declares_what_it_measures_and_its_summary_regenerates_exactly(cells, monkeypatch):
    """The first run writes the folder's declaration; ``--out=<folder> --report_only`` then rewrites the summary
    from the stored cells alone, the same to the byte, and runs nothing."""
    monkeypatch.setattr(quality.subprocess, "call", lambda *args, **kwargs: pytest.fail("a cell was run"))
    first = ["quality.py", f"--out={cells}", "--dataset=tiny", "--seeds=2", "--variants=dccl,data,frequency",
             "--versus=frequency", "--variant=fast:device_epochs=5", "--epochs=20", "--learning_rate=0.003"]
    monkeypatch.setattr(quality.sys, "argv", first)
    quality.main()
    with open(os.path.join(cells, quality.DECLARATION)) as file:
        declared = quality.yaml.safe_load(file)
    assert declared["variants"] == ["dccl", "data", "frequency"] and declared["versus"] == ["frequency"]
    assert declared["define"] == {"fast": {"device_epochs": "5"}}
    assert declared["run"] == {"epochs": 20, "learning_rate": 0.003}
    written = {name: open(os.path.join(cells, name)).read() for name in ("summary.json", "summary.md")}
    for name in written:
        os.remove(os.path.join(cells, name))
    monkeypatch.setattr(quality.sys, "argv", ["quality.py", f"--out={cells}", "--report_only"])
    quality.main()
    assert {name: open(os.path.join(cells, name)).read() for name in written} == written


def test_a_folder_of_baselines_alone_writes_its_cells_and_says_why_it_has_no_summary(tmp_path, monkeypatch, capsys):
    """A baseline trains no round 0, so its cells may run in a folder of their own (RepeatNet: hours on a CPU) and be
    copied beside DCCL cells; its summary would have no cloud-only model to pair with."""
    def run(command, **kwargs):
        result = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--result_file="))
        write_result_file(result, plain_cell(np.full(len(USERS), 0.3)))
        return 0

    monkeypatch.setattr(quality.subprocess, "call", run)
    monkeypatch.setattr(quality.sys, "argv", ["quality.py", f"--out={tmp_path}", "--dataset=tiny", "--seeds=1",
                                              "--variants=frequency"])
    quality.main()
    assert os.path.isfile(quality.cell_path(str(tmp_path), "frequency", 2020))
    assert not os.path.exists(tmp_path / "summary.json")
    assert "no summary: every row is paired with a DCCL variant's cloud-only model" in capsys.readouterr().out


def test_a_run_takes_the_declared_settings_and_a_variant_wins_over_them(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(quality.subprocess, "call", lambda command, **kwargs: commands.append(command) or 0)
    (tmp_path / "logs").mkdir()
    (tmp_path / "cells").mkdir()
    declared = {**quality.DECLARED, "dataset": "tiny", "run": {"epochs": 20, "device_epochs": 3}}
    quality.run_cell(str(tmp_path), declared, "fast", {"device_epochs": "5"}, 2020)
    (command,) = commands
    assert "--epochs=20" in command and "--device_epochs=5" in command
    assert not [arg for arg in command if arg == "--device_epochs=3"]


def test_a_folder_of_fleet_variants_reports_what_each_sent(tmp_path):
    """Variants with a realistic fleet get a table (and fleet.png) of uploads, bytes, epsilon and the device gain;
    a folder whose variants all run the whole fleet gets none (its summary as before)."""
    os.makedirs(tmp_path / "cells")
    base = np.random.default_rng(0).uniform(0.1, 0.5, len(USERS))
    int8 = {**dccl_defaults(), "upload_dtype": "int8", "dp_clip": 0.5, "dp_noise_multiplier": 1.0}
    for name, settings, sent, uploads, epsilon in (("dccl", dccl_defaults(), 256, 40, None), ("int8", int8, 68, 20, 3.5)):
        content = cell(view(base), view(base), view(base * 1.1))
        content["config"] = settings
        content["phase_seconds"] = {"round 1 device": 10.0, "round 1 momodistill": 1.0}
        fleet = {"round": 1, "sampled": uploads, "uploaded": uploads, "upload_bytes_per_device": sent,
                 "upload_bytes": uploads * sent}
        content["fleet"] = [fleet if epsilon is None else {**fleet, "epsilon": epsilon, "delta": 1e-5}]
        write_result_file(quality.cell_path(str(tmp_path), name, 2020), content)
    summary = quality.summarise(quality.load_cells(str(tmp_path), ["dccl", "int8"], [2020]), ["dccl", "int8"], [2020])
    assert summary["fleet"]["int8"]["upload_bytes_per_round"] == 20 * 68 and summary["fleet"]["int8"]["epsilon"] == 3.5
    assert summary["fleet"]["dccl"]["epsilon"] is None and summary["fleet"]["dccl"]["device_seconds_per_round"] == 10.0
    assert summary["fleet"]["int8"]["device_deployed_gain"]["gain"] == pytest.approx(0.1)
    assert "| int8 | 20 | 68 | 1,360 | 3.50 (delta 1e-05) | 10.0 |" in quality.markdown(summary)
    quality.plot(summary, str(tmp_path))
    assert os.path.isfile(tmp_path / "fleet.png")
    whole = quality.summarise(quality.load_cells(str(tmp_path), ["dccl"], [2020]), ["dccl"], [2020])
    assert "fleet" not in whole


def test_a_gain_over_a_few_near_zero_users_has_an_interval_not_nan():
    """Explore targets: most users score 0 under both models; a resample of only those has no gain and is left out
    of the interval (it made the interval nan)."""
    users = list(range(1, 9))
    result = {"test_users": {"users": users, "ndcg@10": [0.5, 0, 0, 0, 0, 0, 0, 0]}}
    baseline = {"test_users": {"users": users, "ndcg@10": [0.25, 0, 0, 0, 0, 0, 0, 0.25]}}
    gain = quality.paired_gain([result], [baseline], "ndcg@10")
    assert gain["gain"] == 0.0
    assert not np.isnan(gain["ci95"]).any() and gain["ci95"][0] <= 0.0 <= gain["ci95"][1]
