"""Error families. Every message names the file or value at fault and what was expected."""

import numbers


class SegdiffError(Exception):
    """Base of every error segdiff raises for bad input; callers show its message as-is."""


class MaskError(SegdiffError, ValueError):
    """A mask has the wrong shape, dtype, size or class ids."""


class DataLayoutError(SegdiffError, ValueError):
    """A data folder does not follow the original layout, or a file in it cannot be read."""


class CheckpointError(SegdiffError, ValueError):
    """A model folder cannot be opened, or does not match what is asked of it."""


class HubError(CheckpointError):
    """The Hugging Face Hub cannot give or take a model: no such id or revision, no network, no permission."""


class ImageError(SegdiffError, ValueError):
    """An image array has the wrong shape, channel count, size or value range."""


class ArgumentError(SegdiffError, ValueError):
    """A function of the library was called with an argument of the wrong kind or out of its range."""


class MissingPackageError(SegdiffError, ImportError):
    """An optional measurement needs a package that is not installed; the message says what to install."""


class ConfigError(SegdiffError, ValueError):
    """A run setting (a flag of the CLI) is out of range or contradicts another."""


def check_range(name: str, value, low, high) -> None:
    """Raise ConfigError unless low <= value <= high; `name` is how the user spelled the setting."""
    if not low <= value <= high:
        raise ConfigError(f"{name} {value}: expected a value in {low}..{high}")


class VolumeError(DataLayoutError):
    """A NIfTI volume or DICOM series cannot be read, paired with its labels, or mapped to the classes asked for."""


def check_integer(name: str, value, low: int, high: int) -> int:
    """`value` as an int in low..high, or ConfigError naming it: a request's raw JSON may hold anything.

    Whole floats (3.0, as JSON numbers may arrive) pass; 2.9, True, "7", None and NaN do not: rounding
    them would run something other than what was asked.
    """
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        shown = "empty" if value is None else repr(value)
        raise ConfigError(f"{name} {shown}: expected an integer in {low}..{high}")
    check_range(name, int(value), low, high)
    return int(value)
