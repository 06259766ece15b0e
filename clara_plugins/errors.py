"""The exceptions that name what is wrong with the user's input or files."""


class InvalidInputError(ValueError):
    """Documents or questions that cannot be compressed or answered (empty, not strings...)."""


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, incomplete, or made for another base model."""


class StoreError(ValueError):
    """A memory store that is corrupted, or was written by another model or compressor."""


def one_line(error: BaseException) -> str:
    """An error's text on one line, as the CLI prints errors: another library's text (an
    uncached hub id's, a remote traceback) may run to several."""
    return " ".join(str(error).split())
