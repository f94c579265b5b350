"""A dataset RecBole does not find goes through RecBole's downloader, from ``dataset_url`` (here 127.0.0.1); without
network the run ends with one message. No test here reaches beyond this machine."""

import functools
import http.server
import os
import re
import socket
import threading
import urllib.request
import zipfile
from urllib.error import URLError

import pytest
import torch
import yaml
from recbole.data import create_dataset

from recbole_dccl.config import DCCLConfig
from recbole_dccl.quick_start import main
from tests.conftest import TINY_SETTINGS, write_dataset


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_ml_1m(tmp_path):
    """``http://127.0.0.1:<port>/ml-1m.zip``: a small dataset in RecBole's atomic format, as RecBole's zips are."""
    source = write_dataset(str(tmp_path / "source"), name="ml-1m")
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "ml-1m.zip", "w") as archive:
        for name in os.listdir(os.path.join(source, "ml-1m")):
            archive.write(os.path.join(source, "ml-1m", name), name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ml-1m.zip"
    server.shutdown()
    server.server_close()


def test_missing_dataset_is_downloaded_from_dataset_url(served_ml_1m, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):  # RecBole 1.2.1 calls this after every download; we skip it outside DDP
        torch.distributed.barrier()
    data_path = tmp_path / "data"
    settings = {**TINY_SETTINGS, "data_path": str(data_path), "dataset_url": served_ml_1m}
    config = DCCLConfig(model="DCCL", dataset="ml-1m", config_dict=settings)
    dataset = create_dataset(config)
    assert sorted(os.listdir(data_path / "ml-1m")) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]
    assert dataset.user_num == 31  # 30 users and RecBole's padding id


def test_without_network_a_missing_dataset_ends_in_one_message(tmp_path, monkeypatch, capsys):
    """``python run_recbole_dccl.py --dataset=ml-1m`` on a machine without network: status 2, no traceback."""
    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    data_path = tmp_path / "data"
    config_file = tmp_path / "local.yaml"
    config_file.write_text(yaml.safe_dump({**TINY_SETTINGS, "data_path": str(data_path)}))
    assert main(["--model=DCCL", "--dataset=ml-1m", f"--config_files={config_file}"]) == 2
    url = "https://recbole.s3-accelerate.amazonaws.com/ProcessedDatasets/MovieLens/ml-1m.zip"  # RecBole's url.yaml
    assert tried == [url]
    error = capsys.readouterr().err
    expected = (
        f"run_recbole_dccl: error: dataset: [ml-1m] is not in data_path (no [{data_path / 'ml-1m' / 'ml-1m.inter'}]) "
        f"and RecBole's download of it from [{url}] failed: [Errno -3] Temporary failure in name resolution. "
    )
    assert error.startswith(expected), error
    assert re.search(r"--data_path=<folder holding ml-1m/> --config_files=", error)
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not os.path.exists(data_path / "ml-1m")  # nothing half-downloaded left for the next run to trip on
