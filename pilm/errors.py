"""Errors pilm raises on bad input: each message says what went wrong and how to fix it."""


class PilmError(Exception):
    """Base class of pilm's errors."""


class EmptyPromptError(PilmError, ValueError):
    """An empty prompt on a model with no BOS token to condition on."""


class ImpossibleTargetError(PilmError):
    """Every particle has zero weight: the potential rules out everything that was proposed."""


class ConfigError(PilmError, ValueError):
    """A setting out of its range; ``field`` names it (the CLI shows it as ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.reason = field, message


class ExtinctionWarning(UserWarning):
    """Every particle of a run died, by chance as far as pilm can tell: the run estimates Z-hat = 0."""


class PotentialError(PilmError, ValueError):
    """A potential broke its contract (NaN, +inf, wrong shape)."""


class BackendError(PilmError, ValueError):
    """A model backend was asked for what it cannot do exactly; the message names the backend that can."""


class ModelLoadError(PilmError, OSError):
    """A model could not be found or loaded."""


class TooLargeError(PilmError, ValueError):
    """An exact computation would enumerate more sequences than allowed."""


class RejectionBudgetError(PilmError):
    """Rejection sampling ran out of draws; ``partial`` holds what was accepted."""

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial


class ResumeMismatchError(PilmError, ValueError):
    """A folder holds a run of other settings; ``differences`` maps each differing setting to
    (saved, requested), and ``remedy`` says the ways out."""

    def __init__(self, folder, differences: dict[str, tuple],
                 remedy: str = "pass another checkpoint_dir, or overwrite=True to start afresh"):
        self.folder, self.differences = folder, differences
        said = "; ".join(f"{k}: {saved!r} there, {now!r} now" for k, (saved, now) in differences.items())
        super().__init__(f"{folder} holds a run of other settings ({said}): resume it with the same settings, "
                         f"or {remedy}")


class DeviceError(PilmError, ValueError):
    """A device or dtype this machine cannot run, or two parts of one run on different devices."""
