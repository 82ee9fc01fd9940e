"""The error taxonomy every adapter translates its library's exceptions into.

The runner only needs to know three things about a failure: try again later
(RetryableError), stop and ask a human (PermanentError), or the effect was
already there (AlreadyDone, which callers treat as success).
"""


class EdgeAgentError(Exception):
    """Base of all errors the agent raises on purpose."""


class RetryableError(EdgeAgentError):
    """A passing fault: network, timeout, 5xx, a lake that is down. Retried with backoff."""


class PermanentError(EdgeAgentError):
    """A fault that retrying cannot mend; the file is quarantined with this message."""


class SourceUnreadable(PermanentError):
    """The local file cannot be read (permissions): the operator's to fix, then `edge-agent retry`."""


class ObjectMissing(PermanentError):
    """The storage holds nothing at the URL (HTTP 404, XRootD 3011, no such file): what
    Transport.open raises, so a caller tells a missing object from a fault by type."""


class ExtractorFailed(PermanentError):
    """A rule's metadata extractor failed (exit status, timeout, output that is not a JSON object of
    scalars, an exception in a plug-in): the file is quarantined with this message, or the rule's
    `on_failure = "skip"` sends it without the extractor's keys."""


class DestinationOccupied(PermanentError):
    """Other bytes lie at a copy's URL, written by nobody this version knows: never replaced."""


class AlreadyDone(EdgeAgentError):
    """The effect already exists (a DID, a replica, a rule): success for an idempotent step."""


class FileChanged(EdgeAgentError):
    """The local file no longer matches what was recorded (size, mtime, inode or content)."""


class FileVanished(EdgeAgentError):
    """The local file is gone or was replaced by something that is not a regular file."""


class SymlinkInPath(FileVanished):
    """The path below the watched directory now goes through a symbolic link (a directory swapped
    for one, or the file itself): the file there is not the one discovered, and nothing is read,
    sent or deleted through it. The version is superseded with this reason, like a vanished file."""


class ChecksumMismatch(EdgeAgentError):
    """A copy's size or checksum differs from the local file's: never counted as a replica."""


class LedgerUnwritable(EdgeAgentError):
    """The ledger cannot record a step (disk full, I/O error): nothing may go on until it can."""


class LedgerUnreachable(LedgerUnwritable):
    """The ledger's database server (PostgreSQL) does not answer or dropped the connection."""


class ConfigError(EdgeAgentError):
    """The configuration is invalid; the message names the key, the value and why."""


class ShuttingDown(EdgeAgentError):
    """Raised inside a step to abandon it at shutdown; the ledger still says where it stood."""


class AgentIdTaken(ConfigError):
    """Another running agent uses this agent's id in the shared ledger (ledger.agent_id)."""
