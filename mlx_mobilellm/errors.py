"""The error type for bad user input (files, tensors, config fields)."""


class CheckpointError(ValueError):
    """Bad input: the message names the file / tensor / field and says what would fix it.
    Command-line entry points print it as one line and exit non-zero."""
