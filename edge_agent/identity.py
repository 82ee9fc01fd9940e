"""Whose ledger is this? The host and the buffer directories a ledger was written for.

A ledger describes files by path, device and inode on one host. Copied to another host
(a restored backup, a cloned VM, a state_dir on shared storage) its rows would describe
other files, so the agent refuses to start on it until an operator adopts it deliberately
(`edge-agent adopt-ledger`). The identity is recorded at creation, or on the first start of
an agent that knows about identities.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid

from .localfs import AGENT_MARK
from .settings import Settings

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
BUFFER_ID_NAME = AGENT_MARK.decode() + "buffer.id"


def machine_id(files: tuple[str, ...] = MACHINE_ID_FILES) -> str:
    for f in files:
        try:
            with open(f) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        if value:
            return value
    return "unknown"


def current(settings: Settings, shared: bool = False) -> dict[str, str]:
    """This host, and each existing rule directory by path and inode (one not there yet is left out).
    `shared`: a ledger agents on several hosts share (the buffer mounted on each at the same path,
    where a shared filesystem gives a file the same inode on every host): the buffer is what the
    ledger belongs to, not a host, so the host is left out."""
    ident: dict[str, str] = {} if shared else {"machine_id": machine_id(), "hostname": socket.gethostname()}
    for name, rule in settings.rules.items():
        try:
            st = os.stat(rule.directory)
        except OSError:
            continue
        ident[f"rule {name} directory"] = f"{rule.directory} inode={st.st_ino}"
        ident[f"rule {name} device"] = str(st.st_dev)
        if shared:
            # two filesystems mounted at one path have the same root inode (2 on ext4, 1 on
            # CephFS): the buffer's own id tells them apart where the host no longer does
            ident[f"rule {name} buffer id"] = buffer_id(rule.directory)
    return ident


def buffer_id(directory: os.PathLike[str] | str) -> str:
    """The id of the buffer at `directory` (a file of the agent's in it, made at the first call;
    the same for every host that mounts it)."""
    path = os.path.join(directory, BUFFER_ID_NAME)
    for _ in range(50):
        try:
            with open(path) as fh:
                value = fh.read().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        # written whole under a name of its own, then published without replacing one another
        # agent published meanwhile (a link is atomic, also over NFS)
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "w") as fh:
                fh.write(uuid.uuid4().hex + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        time.sleep(0.01)
    raise OSError(f"{path}: empty (cannot tell this buffer from another)")


def _compared(key: str) -> bool:
    # Device numbers follow the order disks are found at boot (and a tmpfs gets a new one at each
    # mount): recorded for people, never a reason to refuse a ledger after a reboot.
    return not key.endswith(" device")


def differences(recorded: dict[str, str], here: dict[str, str]) -> list[str]:
    """What differs between the recorded identity and this host. Keys only one side has do not count:
    a rule added to the config, or a directory that does not exist (yet), is no sign of another host."""
    return [f"{k}: ledger has {recorded[k]!r}, here it is {here[k]!r}"
            for k in sorted(recorded.keys() & here.keys()) if _compared(k) and recorded[k] != here[k]]
