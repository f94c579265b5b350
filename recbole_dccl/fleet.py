"""A realistic fleet: which devices take part in a round, whose upload arrives, and what the cloud receives.

In round r, from the seed and r alone (so the same in every process, rank and resumed run), each device online
in r (every device, or those a ``device_availability`` trace lists for r: :func:`read_availability`) is sampled
with probability ``device_participation`` and trains; a sampled device's upload is lost with probability
``device_dropout`` (it keeps its new metapatch; the cloud never sees it). Devices not sampled keep running their
last metapatch, and only sampled devices receive the encoder's new one after step 2. MoMoDistill's teachers are the
devices that uploaded this round, or with ``stale_teachers`` every device with its last uploaded metapatch.

What an uploading device sends: its new metapatch; with ``dp_clip`` its change from the metapatch it started the
round with, clipped to that L2 norm, plus Gaussian noise of standard deviation ``dp_noise_multiplier * dp_clip``
(user-level: one vector per user and round); then encoded as ``upload_dtype`` (:mod:`dccl_device.upload`, the
format a real device writes too). :class:`PrivacyAccount` reports the epsilon of these uploads at ``dp_delta``
(Opacus's RDP accountant, sampling rate ``device_participation``). It covers the uploaded metapatches only: the
rows the cloud takes in each round, and the personal memory's fit, are outside it.

The defaults (participation 1, dropout 0, float32, no clip) take every path of the trainer as before this module.
"""

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from dccl_device.upload import decode, encode, upload_bytes
from recbole_dccl.errors import InputError

PARTICIPATION, DROPOUT, NOISE = range(3)  # the fleet's random streams, apart from every other stream of the run


# config key -> FleetSettings field
FLEET_KEYS = {"device_participation": "participation", "device_dropout": "dropout", "stale_teachers": "stale_teachers",
              "upload_dtype": "upload_dtype", "dp_clip": "dp_clip", "dp_noise_multiplier": "dp_noise_multiplier",
              "dp_delta": "dp_delta"}


@dataclass(frozen=True)
class FleetSettings:
    participation: float
    dropout: float
    stale_teachers: bool
    upload_dtype: str
    dp_clip: float | None
    dp_noise_multiplier: float
    dp_delta: float

    @classmethod
    def from_config(cls, config):
        return cls(**{field: config[key] for key, field in FLEET_KEYS.items()})

    @property
    def whole(self):
        """Every device trains and uploads every round."""
        return self.participation == 1 and self.dropout == 0


class RoundFleet:
    """Round ``round_idx``'s fleet of ``n_users`` devices (user 0, RecBole's padding, never takes part):
    ``sampled`` and ``uploaded`` (``[n_users]`` bool); ``online``: who may take part (``[n_users]`` bool, ``None``:
    everyone)."""

    def __init__(self, settings, n_users, seed, round_idx, online=None):
        self.settings, self.n_users, self.seed, self.round_idx = settings, n_users, seed, round_idx
        self.whole = settings.whole and online is None
        draws = [self._stream(stream).random(n_users) for stream in (PARTICIPATION, DROPOUT)]
        sampled = draws[0] < settings.participation
        if online is not None:
            sampled &= np.asarray(online)
        sampled[0] = False
        self.sampled = torch.from_numpy(sampled)
        self.uploaded = torch.from_numpy(sampled & (draws[1] >= settings.dropout))

    def _stream(self, stream):
        return np.random.default_rng([self.seed, self.round_idx, stream])

    @property
    def teaching(self):
        """Which users' rows MoMoDistill distils from (``None``: all of them)."""
        return None if self.whole or self.settings.stale_teachers else self.uploaded

    def receive(self, users, new, start):
        """What the cloud reads from ``users`` (those that uploaded) whose devices trained from ``start`` to
        ``new`` (``[devices, k]``)."""
        settings, sent = self.settings, new
        if settings.dp_clip is not None:
            change = new - start
            change = change * (settings.dp_clip / change.norm(dim=1, keepdim=True)).clamp(max=1)
            noise = self._stream(NOISE).standard_normal((self.n_users, new.shape[1]))  # every user's: rank-independent
            noise = torch.from_numpy(noise[users.cpu().numpy()]).to(new)
            sent = start + change + settings.dp_noise_multiplier * settings.dp_clip * noise
        if settings.upload_dtype != "float32":
            sent = torch.from_numpy(decode(encode(sent.detach().cpu().numpy(), settings.upload_dtype))).to(new)
        return sent

    def summary(self, metapatch_dim):
        """Counts and bytes of the round, for the log and ``result_file``."""
        uploaded = int(self.uploaded.sum())
        per_device = upload_bytes(metapatch_dim, self.settings.upload_dtype)
        return {"round": self.round_idx, "sampled": int(self.sampled.sum()), "uploaded": uploaded,
                "upload_bytes_per_device": per_device, "upload_bytes": uploaded * per_device}


class PrivacyAccount:
    """The privacy loss of the uploads with ``dp_noise_multiplier`` > 0: epsilon at ``dp_delta`` after a number of
    rounds, each a sampled Gaussian mechanism (sampling rate ``device_participation``), by Opacus's RDP accountant.
    Stateless (a number of rounds in, epsilon out), so a resumed run reports what the uninterrupted one would."""

    def __init__(self, settings):
        self.settings = settings
        self.accountant_class = rdp_accountant()

    def epsilon(self, rounds):
        accountant = self.accountant_class()
        settings = self.settings
        accountant.history = [(settings.dp_noise_multiplier, settings.participation, rounds)]
        return float(accountant.get_epsilon(delta=settings.dp_delta))


def read_availability(path, dataset, rounds):
    """A ``device_availability`` trace: a tab-separated file with a header, one line per user, its token and the
    rounds (1..``rounds``) it is online, separated by spaces::

        user_id:token	rounds:token_seq
        u17	1 3
        u42	2

    Returns ``[rounds + 1, n_users]`` bool (row r: who is online in round r). A user the trace does not list is
    never online; a token the dataset does not know (a user RecBole filtered out) is skipped. A malformed line is an
    :class:`InputError` naming the file and the line."""
    online = np.zeros((rounds + 1, dataset.user_num), dtype=bool)
    with open(path) as file:
        lines = file.read().splitlines()
    known = dataset.field2token_id[dataset.uid_field]
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        token, tab, listed = line.partition("\t")
        try:
            online_rounds = [int(value) for value in listed.split()] if tab else None
        except ValueError:
            online_rounds = None
        if online_rounds is None or any(not 1 <= value <= rounds for value in online_rounds):
            raise InputError(f"device_availability: [{path}] line {number} ({line!r}) must be a user token, a tab and "
                             f"the rounds it is online, integers from 1 to {rounds} separated by spaces.")
        if token in known:
            online[online_rounds, known[token]] = True
    return torch.from_numpy(online)


def rdp_accountant():
    """Opacus's ``RDPAccountant`` (the ``privacy`` extra), or an :class:`InputError` saying how to get it. Imported
    only when a round's epsilon is computed: importing Opacus calls ``logging.basicConfig``, which, before RecBole has
    set up its logger, would leave RecBole's ``init_logger`` without effect (no log file, no formatted log)."""
    check_privacy_extra()
    from opacus.accountants import RDPAccountant

    return RDPAccountant


def check_privacy_extra():
    """Refuse, before training, a run that asks for an epsilon without Opacus installed (nothing is imported)."""
    if importlib.util.find_spec("opacus") is None:
        raise InputError(
            "dp_noise_multiplier: accounting the privacy loss needs Opacus, which is not installed; install the "
            "'privacy' extra: pip install '.[privacy]'"
        )
