"""The one family of errors a user can cause.

Each carries a one-line message meant for a person; the CLI turns them into exit code 2,
the pages into a red banner. Anything else escaping is a bug.
"""


class WorkbenchError(Exception):
    """Base of every error a user can cause or fix."""


class BadInput(WorkbenchError):
    """A file, flag or form value that cannot be used as given."""


class Conflict(BadInput):
    """An edit based on a copy that was changed elsewhere since (another tab, a job); nothing was written."""


class NotFound(WorkbenchError):
    """A dataset, run, job or model that does not exist."""


class BackendError(WorkbenchError):
    """A generation backend failed in a way the user can act on."""


class BackendUnavailable(BackendError):
    """The engine or server cannot be reached or loaded."""


class ModelNotFound(BackendError):
    """The backend has no model of that name."""


class BackendTimeout(BackendError):
    """The backend did not answer in time."""


class BackendBusy(BackendError):
    """The server is at capacity; retrying later may work."""
