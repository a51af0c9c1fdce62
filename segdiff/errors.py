"""Error families. Every message names the file or value at fault and what was expected."""


class SegdiffError(Exception):
    """Base of every error segdiff raises for bad input; callers show its message as-is."""


class MaskError(SegdiffError, ValueError):
    """A mask has the wrong shape, dtype, size or class ids."""


class DataLayoutError(SegdiffError, ValueError):
    """A data folder does not follow the original layout, or a file in it cannot be read."""


class CheckpointError(SegdiffError, ValueError):
    """A model folder cannot be opened, or does not match what is asked of it."""
