"""Exceptions for input a user can fix; the scripts turn them into one line on stderr and exit code 2."""


class InputError(Exception):
    """Bad input (a path, a flag, a file's content) detected before or instead of training."""


class DataError(InputError):
    """A dataset whose files or labels cannot be used as given."""


class CheckpointError(InputError):
    """A checkpoint that does not fit the script it was given to."""


class UnreadableImageError(InputError):
    """One image file that cannot be decoded; inside a dataset it is skipped and counted."""


class OutputError(InputError):
    """An output that cannot be written: a full disk, a read-only folder, another run holding it."""
