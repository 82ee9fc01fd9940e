"""Which root:// client the agent talks through, and its version.

An operator chooses (lake.rucio.root_client): "bindings", the XRootD Python bindings (PyPI
`xrootd`, the `xroot` extra: no process per operation); "xrdcp", the xrdcp/xrdfs commands
(xrootd-client); or "auto", the bindings where this host can import them, else the commands.
The transport (xroot.py) calls the same two "python" and "cli".
"""

from __future__ import annotations

import shutil
import subprocess

from ..errors import PermanentError
from .xroot import Backend, bindings_problem

# the operator's names -> the transport's
_BACKENDS: dict[str, Backend] = {"bindings": "python", "xrdcp": "cli"}
_NAMES = {backend: name for name, backend in _BACKENDS.items()}


class ClientMissing(PermanentError):
    """The root:// client asked for by name is not on this host."""


class BindingsMissing(ClientMissing):
    """The bindings were asked for by name and cannot be imported here."""


class CommandsMissing(ClientMissing):
    """xrdcp was asked for by name and xrdcp or xrdfs is not on PATH."""


def resolve(choice: str) -> Backend:
    """The transport's backend for an operator's choice on this host. Raises ClientMissing for a
    client asked for by name that this host lacks: it is never silently replaced by the other."""
    problem = bindings_problem()
    if choice == "auto":
        return "cli" if problem else "python"
    if choice == "bindings" and problem:
        raise BindingsMissing(f"the XRootD Python bindings cannot be imported ({problem}); they come with "
                              "`pip install 'edge-agent[xroot]'` (PyPI: xrootd), the RPM and the container image")
    missing = [c for c in ("xrdcp", "xrdfs") if shutil.which(c) is None]
    if choice == "xrdcp" and missing:
        raise CommandsMissing(f"{' and '.join(missing)} not found on PATH; they come with the system's XRootD "
                              "client (Debian and EL: xrootd-client)")
    return _BACKENDS[choice]


def name_of(backend: Backend) -> str:
    """The operator's name of a resolved backend ("python" -> "bindings")."""
    return _NAMES[backend]


def client_version(backend: Backend, xrdcp: str = "xrdcp") -> str:
    """The version of the client a resolved backend talks through: the bindings' own, or what
    `xrdcp --version` prints (on stderr, with XRootD 5). A client that cannot tell is "unknown (why)"."""
    if backend == "python":
        import XRootD.client
        version = getattr(XRootD.client, "__version__", None)
        if version:
            return str(version)
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        try:
            return dist_version("xrootd")
        except PackageNotFoundError:
            return "unknown (the bindings name no version)"
    try:
        r = subprocess.run([xrdcp, "--version"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({xrdcp}: {exc})"
    said = (r.stdout.strip() or r.stderr.strip()).splitlines()
    if r.returncode != 0 or not said:
        return f"unknown ({xrdcp} --version: exit status {r.returncode})"
    return said[0].strip()
