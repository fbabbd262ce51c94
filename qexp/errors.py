"""User-facing errors: raised for bad input, printed as one message without a traceback."""


class QexpError(Exception):
    """A problem with the user's input or environment (not a bug in qexp).

    The entry points print ``str(err)`` and exit non-zero; anything else is a genuine bug and keeps
    its traceback.
    """
