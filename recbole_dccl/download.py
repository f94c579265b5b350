"""RecBole's dataset download, with two fixes installed when ``recbole_dccl`` is imported.

* ``dataset_url`` (``properties/overall.yaml``): where to download a dataset that is not under ``data_path``
  (a ``.zip`` of atomic files, as RecBole's own ``url.yaml`` lists them). ``None`` keeps RecBole's address for the
  dataset's name; a mirror, an intranet copy or a test server can be named instead.
* RecBole 1.2.1's ``Dataset._download`` ends with ``torch.distributed.barrier()``, which raises in a
  single-process run, right after the files were downloaded (RecBole issues #1989, #2050). Outside a distributed
  run there is no one to wait for, so the barrier is skipped there; distributed runs keep it.

A download that cannot reach its address (no network) ends in an :class:`InputError` naming the dataset, where it
was looked for, the address and why it failed, and how to use local atomic files instead, not in a ``URLError``
traceback.

RecBole's own downloader (``recbole.utils.url``) still does the work: size check, download, unzip, renaming.
"""

import os
from urllib.error import URLError

import torch
from recbole.data.dataset import Dataset

from recbole_dccl.errors import InputError

_recbole_download = Dataset._download
_recbole_download_url = Dataset._get_download_url


def _get_download_url(self, url_file, allow_none=False):
    if url_file == "url" and self.config["dataset_url"]:
        return self.config["dataset_url"]
    return _recbole_download_url(self, url_file, allow_none)


def _download(self):
    try:
        return _download_once(self)
    except URLError as error:
        name, folder, url = self.dataset_name, self.dataset_path, self._get_download_url("url")
        raise InputError(
            f"dataset: [{name}] is not in data_path (no [{os.path.join(folder, name + '.inter')}]) and RecBole's "
            f"download of it from [{url}] failed: {error.reason}. Without network, put the dataset's atomic files "
            f"({name}.inter, and .user/.item if any) in [{folder}], or point at local atomic files: "
            f"--data_path=<folder holding {name}/> --config_files=<a YAML naming their fields, e.g. load_col>; "
            "or name a reachable copy of the .zip with --dataset_url=..."
        ) from None


def _download_once(self):
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        return _recbole_download(self)
    barrier = torch.distributed.barrier
    torch.distributed.barrier = lambda *args, **kwargs: None
    try:
        return _recbole_download(self)
    finally:
        torch.distributed.barrier = barrier


Dataset._get_download_url = _get_download_url
Dataset._download = _download
