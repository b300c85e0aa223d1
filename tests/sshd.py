"""A real OpenSSH sshd on 127.0.0.1 with its own host key and a test-generated client key."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   timeout=30)
    return (path.with_suffix(".pub")).read_text().strip()


class Sshd:
    """sshd -D -e -f <own config>; `stop()` kills it and every session it forked."""

    def __init__(self, workdir: Path, root: Path | None = None):
        """`root`: sshd runs chrooted there (workdir inside it), so its paths are root-relative."""
        self.dir, self.root = workdir, root
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key_pub = keygen(self.dir / "host_key")
        self.client_key = self.dir / "client_key"
        (self.dir / "authorized_keys").write_text(keygen(self.client_key) + "\n")
        self.config = self.dir / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.seen('host_key')}",
            f"AuthorizedKeysFile {self.seen('authorized_keys')}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp",
            f"PidFile {self.seen('sshd.pid')}", "LogLevel ERROR", "MaxStartups 50",
            "MaxSessions 50", ""]))
        self.proc: subprocess.Popen | None = None
        self.user = os.environ.get("USER") or "root"

    def seen(self, name: str) -> str:
        """A file of workdir as sshd sees it (inside its chroot, if any)."""
        path = self.dir / name
        return "/" + str(path.relative_to(self.root)) if self.root else str(path)

    def launch(self, prefix: list[str] = ()) -> None:
        """Start sshd (optionally under a prefix such as `ip netns exec NS`) without waiting."""
        (Path(self.root or "/") / "run/sshd").mkdir(parents=True, exist_ok=True)
        chroot = ["chroot", str(self.root)] if self.root else []
        with open(self.dir / "log", "a") as log:
            self.proc = subprocess.Popen([*prefix, *chroot, SSHD, "-D", "-e", "-f",
                                          self.seen("sshd_config")],
                                         stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)

    def start(self) -> None:
        self.launch()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {(self.dir / 'log').read_text()[-500:]}")

    def stop(self) -> None:
        """Kill the listener and all its per-connection children (a dropped link, for real)."""
        if self.proc is None:
            return
        # per-connection children leave the process group and re-title themselves: walk /proc
        for pid in [self.proc.pid] + descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None

    @contextlib.contextmanager
    def new_sessions(self):
        """Yields a callable listing the pids (sshd session processes and the commands they run)
        that appeared inside the block; on exit each is SIGCONTed (a test may have frozen it) and
        SIGKILLed, so a fault test leaves nothing behind and the listener keeps serving."""
        before = set(descendants(self.proc.pid))

        def new() -> list[int]:
            return [pid for pid in descendants(self.proc.pid) if pid not in before]

        try:
            yield new
        finally:
            for pid in new():
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass

    @property
    def destination(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_pub.split()[0]} {self.host_key_pub.split()[1]}"


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_sshd(pid: int) -> bool:
    """A per-connection sshd process (not the command it runs for the client)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"
    except OSError:
        return False


def available() -> bool:
    return Path(SSHD).is_file() and shutil.which("ssh-keygen") is not None
