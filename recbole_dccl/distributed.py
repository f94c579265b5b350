"""Multi-process and multi-node DCCL on ``torch.distributed``, the way RecBole 1.2.1 runs its own models.

Launch (:func:`launch`): one process; ``nproc`` processes on this machine (``torch.multiprocessing.spawn``, RecBole's
``--nproc --world_size --ip --port --group_offset``); or one ``torchrun`` worker (``LOCAL_RANK``, ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Every process then builds RecBole's ``Config`` with
``local_rank`` set, which is where the process group starts (:func:`init_process_group`).

Two things in RecBole 1.2.1 assume GPUs, and this module is the shim for both (no edits to RecBole):

- ``Config._init_device`` always asks for the ``nccl`` backend. :func:`init_process_group` (called by
  ``DCCLConfig``) picks ``nccl`` on GPUs and ``gloo`` on CPU.
- ``AbstractTrainer`` wraps the model in ``DistributedDataParallel(model, device_ids=[local_rank])``, which DDP
  refuses for a CPU module. The DDP that RecBole's trainer module builds is replaced by
  :func:`_distributed_data_parallel`, which passes ``device_ids`` for GPU modules only, and does not re-broadcast
  buffers from rank 0 on every forward pass (only when it is built): RecBole converts BatchNorm to SyncBatchNorm,
  whose buffers agree across ranks anyway, and DCCL's per-user tables (``n_users`` rows) are kept equal by the
  trainer itself.

What runs where: RecBole's dataloaders give each rank its share of the rows (``DistributedSampler``); cloud
training is data-parallel (DDP); the device phase gives each rank its share of the users
(:func:`user_share`) and gathers their metapatches (:func:`gather_user_rows`); evaluation gathers every rank's
collected rows (:func:`gather_eval_rows`) so metrics, per-group ones included, are those of one process. Only
rank 0 writes files.
"""

import inspect
import os

import recbole.trainer.trainer
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

TORCHRUN_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# Launching ----------------------------------------------------------------------------------------------------


def launch(function, kwargs, nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0):
    """Run ``function(**kwargs)`` (``kwargs`` has a ``config_dict``) in this process, as a torchrun worker, or in
    ``nproc`` spawned processes ranked ``group_offset ... group_offset + nproc - 1`` of ``world_size`` (default
    ``nproc``) that meet at ``ip:port``; returns the result of (this machine's) rank 0."""
    config_dict = dict(kwargs.get("config_dict") or {})
    if nproc == 1 and world_size <= 0:
        if not all(name in os.environ for name in TORCHRUN_VARIABLES):
            return function(**{**kwargs, "config_dict": config_dict})
        config_dict.update(torchrun_settings(os.environ))
        return _run_rank(config_dict.pop("local_rank"), function, {**kwargs, "config_dict": config_dict}, None)

    import torch.multiprocessing as mp

    config_dict.update(
        world_size=world_size if world_size > 0 else nproc, ip=ip, port=port, nproc=nproc, offset=group_offset
    )
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_run_rank, args=(function, {**kwargs, "config_dict": config_dict}, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def torchrun_settings(environ):
    """RecBole's distributed keys from the environment torchrun gives every worker."""
    local_rank = int(environ["LOCAL_RANK"])
    return {
        "local_rank": local_rank,
        "offset": int(environ["RANK"]) - local_rank,
        "world_size": int(environ["WORLD_SIZE"]),
        "nproc": int(environ.get("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])),
        "ip": environ["MASTER_ADDR"],
        "port": environ["MASTER_PORT"],
    }


def _run_rank(local_rank, function, kwargs, queue):
    kwargs["config_dict"]["local_rank"] = local_rank
    try:
        result = function(**kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if local_rank == 0 and queue is not None:
        queue.put(result)
    return result


def init_process_group(settings):
    """The distributed part of RecBole's ``Config._init_device``, with ``gloo`` on CPU; ``settings`` is the
    config's ``final_config_dict`` (``gpu_id: ''`` keeps a run on CPU on a machine with GPUs)."""
    gpu_id = settings["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, tuple) else str(gpu_id)
    settings["gpu_id"] = gpu_id
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    local_rank, nproc = settings["local_rank"], settings["nproc"]
    on_gpu = len(gpu_id) > 0 and torch.cuda.is_available()
    if on_gpu and len(gpu_id.split(",")) < nproc:
        raise ValueError(
            f"gpu_id: [{gpu_id}] lists fewer GPUs than nproc [{nproc}]; list one GPU per process "
            f"(e.g. --gpu_id={','.join(map(str, range(nproc)))}) or set gpu_id: '' to run on CPU."
        )
    dist.init_process_group(
        backend="nccl" if on_gpu else "gloo",
        rank=local_rank + settings["offset"],
        world_size=settings["world_size"],
        init_method=f"tcp://{settings['ip']}:{settings['port']}",
    )
    settings["device"] = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    settings["single_spec"] = False
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if local_rank != 0:
        settings["state"] = "error"
        settings["show_progress"] = False
        settings["verbose"] = False


# Who does what -------------------------------------------------------------------------------------------------


def is_distributed(config):
    return not config["single_spec"]


def is_main_process(config):
    """Rank 0, or the only process: the one that writes checkpoints and result files."""
    return not is_distributed(config) or dist.get_rank() == 0


def user_share(config):
    """``(index, parts)``: this rank personalises the users at positions ``index, index + parts, ...``."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed(config) else (0, 1)


# Training ------------------------------------------------------------------------------------------------------


# torch 2.13 renamed DDP's broadcast_buffers (which it deprecates) to forward_sync_buffers.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _distributed_data_parallel(module, device_ids=None, **kwargs):
    on_cpu = next(module.parameters()).device.type == "cpu"
    return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **{**_NO_BUFFER_SYNC, **kwargs})


recbole.trainer.trainer.DistributedDataParallel = _distributed_data_parallel


def data_parallel(model, config):
    """``model`` behind DDP, which averages the gradients of the parameters that require grad now (the ones the
    calling phase trains); ``model`` itself in one process. Build it per phase, after freezing the rest."""
    if not is_distributed(config):
        return model
    device = config["device"]
    return _distributed_data_parallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def advance_epoch(loader):
    """A new order for each pass over ``loader``: a single process's loader reshuffles on every pass, a
    ``DistributedSampler`` only when told the epoch."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(sampler.epoch + 1)


def gather_user_rows(config, users, rows, n_users):
    """Every rank's ``users`` (ranks hold disjoint users) and their ``rows`` (``[len(users), ...]``), by user id.
    A zero table with this rank's rows filled in, summed over ranks, holds each user's rows exactly once."""
    if not is_distributed(config):
        return users, rows
    held = torch.zeros(n_users, dtype=torch.long, device=users.device)
    held[users] = 1
    table = torch.zeros((n_users, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    table[users] = rows
    dist.all_reduce(held)
    dist.all_reduce(table)
    all_users = torch.nonzero(held).squeeze(1)
    return all_users, table[all_users]


def sum_over_ranks(config, number):
    if not is_distributed(config):
        return number
    total = torch.tensor([number], dtype=torch.float64, device=config["device"])
    dist.all_reduce(total)
    return total.item()


# Evaluation ----------------------------------------------------------------------------------------------------


def padded_samples(loader):
    """How many samples at the end of this rank's share of ``loader`` are ``DistributedSampler`` padding (it
    repeats the first samples so every rank gets as many): 0 or 1."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        return 0
    own = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))
    return sampler.num_samples - own


def gather_eval_rows(struct, row_keys, padded, segments=None):
    """``struct`` (a RecBole ``DataStruct``) with its per-row tensors ``row_keys`` replaced by every rank's rows,
    without this rank's ``padded`` trailing repeats, in one process's order. An evaluation ``DistributedSampler``
    (no shuffling) deals sample ``i`` to rank ``i % world_size``, and evaluation collects one row per sample in every
    mode (full sort, labeled, uniN/popN), which is what makes the trailing rows the padding. ``segments``:
    ``(count_key, keys)``, tensors ``keys`` that hold consecutive runs of entries, ``struct[count_key][r]`` of them
    for row ``r`` (``count_key`` among ``row_keys``), gathered with their rows."""
    local = {key: struct[key][: len(struct[key]) - padded] for key in row_keys if key in struct}
    count_key, segment_keys = segments or (None, ())
    kept_entries = int(local[count_key].sum()) if count_key in local else 0
    local_segments = {key: struct[key][:kept_entries] for key in segment_keys if key in struct}
    world_size = dist.get_world_size()
    everyone = [None] * world_size
    dist.all_gather_object(everyone, (local, local_segments))
    if not local:
        return struct
    lengths = [len(next(iter(rows.values()))) for rows, _ in everyone]
    sample = torch.cat([torch.arange(length) * world_size + rank for rank, length in enumerate(lengths)])
    order = torch.argsort(sample)
    for key in local:
        struct[key] = torch.cat([rows[key] for rows, _ in everyone])[order]
    if local_segments:
        counts = torch.cat([rows[count_key] for rows, _ in everyone])
        entry_order = torch.argsort(torch.repeat_interleave(sample, counts), stable=True)
        for key in local_segments:
            struct[key] = torch.cat([entries[key] for _, entries in everyone])[entry_order]
    return struct


class DistributedTrainerMixin:
    """Put before a RecBole trainer: all ranks name the same checkpoint file (RecBole stamps it with each process's
    clock) and wait for rank 0 to have written it before loading it."""

    def __init__(self, config, model):
        super().__init__(config, model)
        if is_distributed(config):
            name = [self.saved_model_file]
            dist.broadcast_object_list(name, src=0)
            self.saved_model_file = name[0]

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and is_distributed(self.config):
            dist.barrier()
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)
