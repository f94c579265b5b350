"""What a device trains its metapatch with: the one translation from DCCL's ``device_*`` keys to the device phase.

recbole_dccl's batched device phase runs every device with a :class:`DeviceSettings` built from the config
(:meth:`DeviceSettings.from_config`, which also refuses bad values before any training); the ONNX export writes its
device part into the training artifacts' ``settings.json`` (:meth:`DeviceSettings.device_part`), and
``python -m dccl_device`` reads it back (:meth:`DeviceSettings.from_device_part`), so the simulated devices and a
real one train alike. Standard library only: a device has no torch.
"""

from dataclasses import asdict, dataclass, fields

from dccl_device.upload import UPLOAD_DTYPES


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# config key -> (field, test, what is valid)
RULES = {
    "device_epochs": ("epochs", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "device_learning_rate": ("learning_rate", lambda v: _number(v) and v > 0, "a number > 0"),
    "device_batch_size": ("batch_size", lambda v: _integer(v) and v > 0, "a positive integer"),
    "device_valid_size": ("valid_size", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "device_select": ("select", lambda v: v in ("best", "last"), "'best' or 'last'"),
    "device_l2": ("l2", lambda v: _number(v) and v >= 0, "a number >= 0"),
    "device_chunk_size": ("chunk_size", lambda v: _integer(v) and v > 0, "a positive integer"),
    "device_cache_mb": ("cache_bytes", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "upload_dtype": ("upload_dtype", lambda v: v in UPLOAD_DTYPES, f"one of {list(UPLOAD_DTYPES)}"),
}
SIMULATION = ("chunk_size", "cache_bytes", "show_progress")  # how the cloud runs all devices at once; no device's


@dataclass(frozen=True)
class DeviceSettings:
    epochs: int  # passes over the device's training rows
    learning_rate: float  # Adam's
    batch_size: int  # rows per local minibatch
    valid_size: int  # newest interactions held out for the guard (0: no guard, every device keeps what it trained)
    select: str  # 'best': the best of the start and every epoch's metapatch on them; 'last': the final one alone
    l2: float  # weight of |metapatch - start|^2 in the loss
    upload_dtype: str = "float32"  # how the metapatch travels to the cloud (dccl_device.upload)
    rows_per_interaction: int = 1  # a positive and its fixed negatives, on implicit data
    chunk_size: int = 1024  # rows per forward pass when all devices train at once
    cache_bytes: int = 0  # memory for the lowest patch site's outputs, computed once per round (0: none)
    show_progress: bool = False

    @classmethod
    def from_config(cls, config, rows_per_interaction=1):
        """The settings of ``config`` (DCCL's keys, a ``Config`` or a dict); a bad value is refused with a
        :class:`ValueError` naming its key and what would be valid."""
        values = {}
        for key, (name, is_valid, valid) in RULES.items():
            if not is_valid(config[key]):
                raise ValueError(f"{key}: [{config[key]!r}] is not valid; it must be {valid}.")
            values[name] = config[key]
        values["cache_bytes"] *= 2**20  # device_cache_mb
        show_progress = bool(config["show_progress"]) if "show_progress" in config else False
        return cls(**values, rows_per_interaction=rows_per_interaction, show_progress=show_progress)

    def device_part(self):
        """What a device trains with, as plain values (the simulation's settings left out)."""
        return {name: value for name, value in asdict(self).items() if name not in SIMULATION}

    @classmethod
    def from_device_part(cls, stored):
        """The settings a device was given (:meth:`device_part`, as ``settings.json`` holds them)."""
        return cls(**{field.name: stored[field.name] for field in fields(cls) if field.name in stored})
