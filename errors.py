"""The one error type a user can cause. The CLI prints its message on one line, no traceback.

Every layer may raise it (it is a leaf module, not a layer): the message must say what went
wrong *and what to do about it*.
"""


class KilnError(Exception):
    """A problem with the user's input (model, artifact, target, request), not a kiln bug."""
