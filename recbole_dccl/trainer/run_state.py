"""What a DCCL run carries from phase to phase, in the two objects ``DCCLTrainer`` owns and a run-state file saves
whole (:mod:`resume`): the :class:`RunRecord` (what the report is made of) and the :class:`RoundState` (the round
being run)."""

from recbole_dccl.trainer.momodistill import DeviceTeachers


class RunRecord:
    """The run so far: every phase's scores (``history``), the best and the latest scores of each view (``best``,
    with the selected device view's state) and the seconds each phase took (``phase_seconds``)."""

    KEYS = ("history", "best", "phase_seconds")

    def __init__(self, history=None, best=None, phase_seconds=None):
        self.history = history if history is not None else []
        self.best = best if best is not None else {}
        self.phase_seconds = phase_seconds if phase_seconds is not None else {}

    def state(self):
        return {key: getattr(self, key) for key in self.KEYS}

    @classmethod
    def from_state(cls, state):
        return cls(**{key: state[key] for key in cls.KEYS})


class RoundState:
    """The round being run: the ``loader`` of the rows the devices hold (which the cloud then takes in), the
    :class:`RowCache` of those rows, the round's ``fleet`` (:class:`~recbole_dccl.fleet.RoundFleet`: which devices
    train and upload, drawn from the seed and the round, so never saved), and, once MoMoDistill step 1 has built
    them, the round's ``teachers`` (step 2 still needs the device models step 1 learned from)."""

    def __init__(self, loader, cache, fleet):
        self.loader, self.cache, self.fleet = loader, cache, fleet
        self.teachers = None

    def state(self, phase):
        """What a resumed run needs to go on inside this round after ``phase``: the loader's shuffling generator, and
        after step 1 the teachers (no later phase of the round reads them once step 2 is done)."""
        return {
            "loader_generator": self.loader.generator.get_state(),
            "teachers": self.teachers.state if phase == "momodistill" else None,
        }

    def restore(self, state, model, device):
        self.loader.generator.set_state(state["loader_generator"])
        if state["teachers"] is not None:
            teachers = {name: value.to(device) for name, value in state["teachers"].items()}
            self.teachers = DeviceTeachers(model, teachers, cache=self.cache, teaching=self.fleet.teaching)
