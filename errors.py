"""The one error type a user can cause. The CLI prints its message on one line, no traceback.

Every layer may raise it (it is a leaf module, not a layer): the message must say what went
wrong *and what to do about it*.
"""


class KilnError(Exception):
    """A problem with the user's input (model, artifact, target, request), not a kiln bug.
    `param`: the request field at fault, when a request caused it (a server's 400 names it)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param
