"""The exceptions that name what is wrong with the user's input or files, and the warnings
that say what was done about it."""

import sys
import warnings


class InvalidInputError(ValueError):
    """Documents or questions that cannot be compressed or answered (empty, not strings...)."""


class CheckpointError(ValueError):
    """A checkpoint that is corrupted, incomplete, or made for another base model."""


class StoreError(ValueError):
    """A memory store that is corrupted, or was written by another model or compressor."""


# what warn_bounded showed (the default filter shows a text once a line), emptied at this size
_SHOWN: dict = {}
_SHOWN_AT_MOST = 1024


def warn_bounded(message: str, stacklevel: int = 1) -> None:
    """``warnings.warn`` (``stacklevel`` counted as it counts), recording what it showed in one
    bounded registry rather than the warned module's: these messages name counts or ids of one
    call, and each one was kept for the life of the process (a service warned per request grew
    by each). A text repeated word for word is shown once, as before."""
    if len(_SHOWN) > _SHOWN_AT_MOST:
        _SHOWN.clear()
    try:
        frame = sys._getframe(stacklevel)  # 1: the caller's line, as warnings.warn's 1
    except ValueError:  # fewer frames than that: named as warnings.warn names it
        warnings.warn_explicit(message, UserWarning, "sys", 1, module="sys", registry=_SHOWN)
        return
    # the module's name as warnings.warn takes it (a filter may name it); without one, nothing was shown
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__", "<string>"), registry=_SHOWN)


def one_line(error: BaseException) -> str:
    """An error's text on one line, as the CLI prints errors: another library's text (an
    uncached hub id's, a remote traceback) may run to several."""
    return " ".join(str(error).split())
