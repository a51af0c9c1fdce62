"""Error families. Every message names the file or value at fault and what was expected."""


class SegdiffError(Exception):
    """Base of every error segdiff raises for bad input; callers show its message as-is."""


class MaskError(SegdiffError, ValueError):
    """A mask has the wrong shape, dtype, size or class ids."""


class DataLayoutError(SegdiffError, ValueError):
    """A data folder does not follow the original layout, or a file in it cannot be read."""


class CheckpointError(SegdiffError, ValueError):
    """A model folder cannot be opened, or does not match what is asked of it."""


class ImageError(SegdiffError, ValueError):
    """An image array has the wrong shape, channel count, size or value range."""


class ConfigError(SegdiffError, ValueError):
    """A run setting (a flag of the CLI) is out of range or contradicts another."""


def check_range(name: str, value, low, high) -> None:
    """Raise ConfigError unless low <= value <= high; `name` is how the user spelled the setting."""
    if not low <= value <= high:
        raise ConfigError(f"{name} {value}: expected a value in {low}..{high}")


class VolumeError(DataLayoutError):
    """A NIfTI volume cannot be read, paired with its labels, or mapped to the classes asked for."""
