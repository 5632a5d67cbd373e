"""The exceptions twinfed raises on purpose.

Every message is one line that says what is wrong, where (file, row, column, entry) and what to
do. The CLI catches :class:`TwinfedError` and prints the message without a traceback.
"""


class TwinfedError(Exception):
    """Base class: a problem the user can act on."""


class SpecError(TwinfedError):
    """A twin spec is malformed or does not match the data or the model."""


class DataError(TwinfedError):
    """A site's export breaks the data contract.

    ``file``, ``row`` (1-based data row) and ``column`` say where, apart from the message, so a
    node can report *where* to the coordinator without the message's value (see
    :mod:`twinfed.wire`); the message itself is for the node's own console.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        super().__init__(message)
        self.file, self.row, self.column = file, row, column


class ConsentError(TwinfedError):
    """Consent records are malformed or no patient is consented for the study."""


class PlanError(TwinfedError):
    """A training plan is malformed or inconsistent."""


class ModelError(TwinfedError):
    """A trained model directory is missing, incomplete or does not fit the request."""


class ScenarioError(TwinfedError):
    """A what-if scenario could not be parsed or applied."""


class PlanNotApproved(PlanError):
    """A node was asked to act on a training plan its privacy officer has not approved."""


class KeyFileError(TwinfedError):
    """A signing key file is missing, unreadable, malformed or not private enough."""


class AuditError(TwinfedError):
    """An audit log cannot be appended to or read (a torn entry, a broken chain, a bad key)."""


class NodeStateError(TwinfedError):
    """A node's or coordinator's state directory is missing, incomplete or already initialised."""


class TrialError(TwinfedError):
    """An in-silico trial's arms file is malformed, or the trial cannot run on the data given."""
