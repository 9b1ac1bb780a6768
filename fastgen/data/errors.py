"""Errors shared by the dataset loaders."""


class DatasetMissingError(FileNotFoundError):
    """A dataset is not installed or not found; the message names the command
    that installs it (or where to put the files)."""
