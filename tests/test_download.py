"""A dataset RecBole does not find goes through RecBole's downloader, from ``dataset_url`` (here 127.0.0.1)."""

import functools
import http.server
import os
import threading
import zipfile

import pytest
import torch
from recbole.data import create_dataset

from recbole_dccl.config import DCCLConfig
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
