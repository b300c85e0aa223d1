"""SSH devices (paramiko), staged like TVM's RPC runner: connect -> ensure runtime -> upload ->
run -> cleanup, each timed and under its own timeout. Host keys are always checked (@revoked
keys in known_hosts are refused), `IdentitiesOnly yes` is honoured, and a destination may hold
only host-name characters, because ~/.ssh/config's `Match exec` hands it to a shell.

Every remote path and argument goes through `shlex.quote`. Uploads are content-addressed
(`<remote dir>/bundles/<sha256>/`), streamed from the files as one tar, written to a temporary
name, verified on the device, then renamed, so a dropped link never leaves a half bundle that is
later used. A probe every few seconds notices a device or link that went silent.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import select
import shlex
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

import device_runtime
from device_runtime.bundle import sha256_file
from device_runtime.result import Result

from ..bundle import Bundle
from .. import cancel
from ..errors import EdgesmithError, StageError
from ..targets import BACKEND_PACKAGES
from . import Job, parse_reply, parse_result

q = shlex.quote
RUNTIME_SRC = Path(device_runtime.__file__).resolve().parent
DEFAULT_REMOTE_DIR = "~/.edgesmith"
MIN_DEVICE_PYTHON = (3, 8)     # device_runtime's oldest (importlib.metadata); tested with 3.8
KEEPALIVE_S = 5.0          # ask the device for a reply this often (OpenSSH's ServerAliveInterval)
LINK_LOST_S = 20.0         # no reply and no data this long: the device or the link is gone
LEASE_MARGIN_S = 5.0       # a run whose heartbeat is silent for LINK_LOST_S + this ends itself
UPLOAD_CHUNK = 1 << 16     # progress (and liveness) is seen per chunk, even on a slow link
STALE_TMP_MIN = 60         # temp dirs older than this were left by dropped links: swept
# a full disk (or quota) as the device's tools report it; GNU tar only says "Wrote only N of M"
NO_SPACE = ("No space left on device", "Disk quota exceeded", "Wrote only")
# user@host[:port] | user@[v6]:port | alias: host-name characters only, checked before any
# ~/.ssh/config lookup (its `Match exec` runs a shell with the host filled in)
DESTINATION = re.compile(r"(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?"
                         r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]*))"
                         r"(?::(?P<port>[0-9]{1,5}))?")
# run on the device to check uploaded files against their sha256 (argv[1]: {path: sha256});
# files are hashed in 1 MiB chunks, so a big model never has to fit in the device's memory
VERIFY_SNIPPET = (
    "import hashlib,json,sys\n"
    "def sha(p):\n"
    " d=hashlib.sha256()\n"
    " with open(p,'rb') as f:\n"
    "  for b in iter(lambda:f.read(1<<20),b''):d.update(b)\n"
    " return d.hexdigest()\n"
    "bad=[p for p,h in json.loads(sys.argv[1]).items() if sha(p)!=h]\n"
    "print(json.dumps(bad)); sys.exit(1 if bad else 0)")


@dataclass
class SSHTarget:
    """Where to connect, after ~/.ssh/config has been applied."""

    alias: str
    hostname: str
    user: str
    port: int = 22
    identity_files: list[str] = field(default_factory=list)
    proxy_command: str | None = None
    identities_only: bool = False      # IdentitiesOnly yes: no agent keys, no ~/.ssh/id_*

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _ssh_config() -> paramiko.SSHConfig:
    path = Path(os.path.expanduser("~/.ssh/config"))
    try:
        return paramiko.SSHConfig.from_path(str(path)) if path.is_file() else paramiko.SSHConfig()
    except (paramiko.ConfigParseError, OSError, UnicodeDecodeError) as exc:
        raise EdgesmithError(f"cannot read {path}: {exc}; fix that line") from None


def parse_destination(destination: str) -> tuple[str | None, str, int | None]:
    """(user, host, port) of `user@host[:port]`, `user@[v6]:port` or an alias. Anything but
    host-name characters is refused here, before ~/.ssh/config could hand it to a shell."""
    m = DESTINATION.fullmatch(destination)
    if not m:
        raise EdgesmithError(f"bad device {destination!r}: only letters, digits, '.', '-', '_' "
                             "(and [IPv6]) may form it; write `local`, user@host[:port] or a "
                             "Host alias from ~/.ssh/config")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise EdgesmithError(f"bad device {destination!r}: port {port} is not 1-65535")
    return m.group("user"), m.group("v6") or m.group("host"), port


def resolve(destination: str, identity: str | None = None) -> SSHTarget:
    """`user@host[:port]`, `user@[v6addr]:port` or a Host alias from ~/.ssh/config."""
    user, host, port = parse_destination(destination)
    try:   # a bad Match line, `invoke` missing for Match exec, Port not a number
        cfg = _ssh_config().lookup(host)
        port = port or int(cfg.get("port") or 22)
    except (paramiko.SSHException, ImportError, ValueError) as exc:
        raise EdgesmithError(f"~/.ssh/config cannot be applied to {host!r}: {exc}; fix it") from None
    user = user or cfg.get("user") or os.environ.get("USER") or "root"
    identities = [os.path.expanduser(identity)] if identity else \
        [os.path.expanduser(p) for p in cfg.get("identityfile", [])]
    proxy = cfg.get("proxycommand")
    if cfg.get("proxyjump") and not proxy:  # ProxyJump host[:port] == ProxyCommand ssh -W
        proxy = f"ssh -W %h:%p {cfg['proxyjump']}"
    hostname = cfg.get("hostname", host)
    if proxy:
        proxy = proxy.replace("%h", hostname).replace("%p", str(port)).replace("%r", user)
    only = str(cfg.get("identitiesonly", "no")).lower() == "yes"
    return SSHTarget(host, hostname, user, port, identities, proxy, only)


def read_known_hosts(path: Path) -> tuple[list[tuple[str, paramiko.PKey]], set[str]]:
    """([(host pattern, key)], {base64 of @revoked keys}). paramiko cannot parse marker lines
    (it raises on them), so they are read here; a key @revoked on any line is never accepted."""
    entries: list[tuple[str, paramiko.PKey]] = []
    revoked: set[str] = set()
    if not path.is_file():
        return entries, revoked
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):   # @revoked HOSTS TYPE KEY; @cert-authority: paramiko has no CAs
            fields = line.split()
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add(fields[3])
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
        except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError):
            continue   # like OpenSSH: a broken line is skipped, never trusted
        if entry is not None:
            entries += [(name, entry.key) for name in entry.hostnames]
    return entries, revoked


class _RecordNewHostKey(paramiko.MissingHostKeyPolicy):
    """StrictHostKeyChecking=accept-new: record an unknown host's key; a changed key is refused."""

    def __init__(self, known_hosts: Path):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        print(f"recorded new host key for {hostname} ({key.get_name()} "
              f"{key.fingerprint}) in {self.known_hosts}", file=sys.stderr)


class RevokedHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey):
        super().__init__(f"host key {key.fingerprint} is revoked")
        self.key = key


class _Transport(paramiko.Transport):
    """Prefers AES-GCM (~25% more bytes per second than paramiko's default AES-CTR+HMAC; every
    other cipher stays, so old servers like dropbear still connect) and refuses a @revoked host
    key right after key exchange, before authentication and before any known_hosts lookup."""

    def __init__(self, *args, revoked: frozenset = frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.revoked = revoked
        options = self.get_security_options()
        gcm = tuple(c for c in options.ciphers if c.endswith("-gcm@openssh.com"))
        options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)

    def start_client(self, event=None, timeout=None):
        super().start_client(event, timeout)
        key = self.get_remote_server_key()
        if key.get_base64() in self.revoked:
            self.close()
            raise RevokedHostKey(key)


class _LinkWatch:
    """ServerAliveInterval for paramiko. `Transport.set_keepalive` sends its packets with
    want_reply=false, so a frozen device or a dark link never shows and a run waits out its
    whole timeout; this asks for a reply every few seconds and closes the transport when no
    reply and no data came for `lost_after_s` — closing is what ends paramiko's blocking calls."""

    def __init__(self, transport: paramiko.Transport, lost_after_s: float):
        self.transport, self.lost_after_s = transport, lost_after_s
        self.interval_s = min(KEEPALIVE_S, lost_after_s / 3)
        self.last, self.lost = time.monotonic(), False
        for job in (self._probe, self._watch):
            threading.Thread(target=job, daemon=True, name=f"edgesmith-link{job.__name__}").start()

    def alive(self) -> None:
        self.last = time.monotonic()

    def _probe(self) -> None:
        while self.transport.is_active():
            try:   # any reply will do: OpenSSH and dropbear answer "failure"
                self.transport.global_request("keepalive@openssh.com", wait=True)
            except (EOFError, OSError, paramiko.SSHException):
                return   # closed under the probe: whoever closed it reports why
            if self.transport.is_active():
                self.alive()
            until = time.monotonic() + self.interval_s
            while self.transport.is_active() and time.monotonic() < until:
                time.sleep(0.1)

    def _watch(self) -> None:
        while self.transport.is_active():
            if time.monotonic() - self.last > self.lost_after_s:
                self.lost = True
                self.transport.close()
                return
            time.sleep(0.1)


def _runtime_files() -> dict[str, bytes]:
    return {str(p.relative_to(RUNTIME_SRC.parent)): p.read_bytes()
            for p in sorted(RUNTIME_SRC.rglob("*.py"))}


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    """Exactly `size` bytes of `path`, 1 MiB at a time (a changed file fails the device check)."""
    try:
        with open(path, "rb") as fh:
            while size > 0:
                block = fh.read(min(1 << 20, size))
                if not block:
                    raise EdgesmithError(f"{path} shrank while it was uploaded; rebuild the bundle")
                size -= len(block)
                yield block
    except OSError as exc:
        raise EdgesmithError(f"cannot read {path} to upload it ({exc.strerror}); rebuild the "
                             "bundle") from None


def tar_stream(files: dict[str, bytes | Path]) -> tuple[int, Iterator[bytes]]:
    """(total size, chunks) of a tar of `files`, read from disk while it is sent: the host never
    holds a bundle, let alone the bundle and its tar, in memory."""
    members = []
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
        info.mode, info.mtime = 0o644, 0
        members.append((info.tobuf(), data, info.size))
    total = sum(len(h) + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                for h, _, size in members) + 2 * tarfile.BLOCKSIZE
    padded = -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE   # as tarfile.close() pads

    def chunks() -> Iterator[bytes]:
        for header, data, size in members:
            yield header
            yield from [data] if isinstance(data, bytes) else _file_chunks(Path(data), size)
            yield tarfile.NUL * (-size % tarfile.BLOCKSIZE)
        yield tarfile.NUL * (padded - total + 2 * tarfile.BLOCKSIZE)

    return padded, chunks()


def _sweep(parent: str) -> str:
    """Shell: remove temp dirs under `parent` that dropped links left (never read, only space)."""
    return (f"find {q(parent)} -maxdepth 1 -name '.tmp-*' -mmin +{STALE_TMP_MIN} "
            "-exec rm -rf {} + 2>/dev/null")


@dataclass
class RemoteRuntime:
    python: str
    path: str           # directory holding device_runtime/ (goes on PYTHONPATH)
    facts: dict
    has_timeout: bool


class SSHDevice:
    """A device reached over SSH; keeps one connection for all its stages."""

    def __init__(self, target: SSHTarget, accept_new_host_key: bool = False,
                 python: str | None = None, remote_dir: str | None = None,
                 connect_timeout_s: float = 15.0, upload_timeout_s: float = 600.0,
                 stall_timeout_s: float = LINK_LOST_S, name: str | None = None):
        self.target, self.accept_new = target, accept_new_host_key
        self.python = python
        self.remote_dir = remote_dir or os.environ.get("EDGESMITH_REMOTE_DIR", DEFAULT_REMOTE_DIR)
        self.connect_timeout_s, self.upload_timeout_s = connect_timeout_s, upload_timeout_s
        self.stall_timeout_s = stall_timeout_s     # no reply, no progress this long: link gone
        self.name = name or target.alias
        self.on_upload_progress = None   # callable(sent_bytes, total_bytes), e.g. a progress bar
        self._client: paramiko.SSHClient | None = None
        self._watch: _LinkWatch | None = None
        self._runtime: RemoteRuntime | None = None
        self._root: str | None = None

    @classmethod
    def from_destination(cls, destination: str, identity: str | None = None, **options):
        options.setdefault("name", destination)
        return cls(resolve(destination, identity), **options)

    # --- connect ------------------------------------------------------------------------------
    def _keys(self) -> list[str]:
        """The identity files that exist; none of the configured ones existing is an error
        (OpenSSH skips a missing one silently, paramiko fails with a misleading socket error)."""
        files = self.target.identity_files
        present = [f for f in files if os.path.isfile(f)]
        if files and not present:
            raise StageError("connect", f"identity file {files[0]} does not exist; fix the path "
                             "(--identity, identity in devices.toml or IdentityFile in "
                             "~/.ssh/config)")
        return present

    def connect(self) -> paramiko.SSHClient:
        if self._client is not None and self._client.get_transport() is not None \
                and self._client.get_transport().is_active():
            return self._client
        t = self.target
        keys = self._keys()
        known_hosts = Path(os.path.expanduser("~/.ssh/known_hosts"))
        entries, revoked = read_known_hosts(known_hosts)
        client = paramiko.SSHClient()
        for hostname, key in entries:
            client.get_host_keys().add(hostname, key.get_name(), key)
        client.set_missing_host_key_policy(_RecordNewHostKey(known_hosts) if self.accept_new
                                           else paramiko.RejectPolicy())
        sock = paramiko.ProxyCommand(t.proxy_command) if t.proxy_command else None
        try:
            client.connect(t.hostname, port=t.port, username=t.user, key_filename=keys or None,
                           timeout=self.connect_timeout_s, banner_timeout=self.connect_timeout_s,
                           auth_timeout=self.connect_timeout_s, sock=sock,
                           allow_agent=not t.identities_only,
                           look_for_keys=not (t.identities_only and keys),
                           transport_factory=functools.partial(_Transport,
                                                               revoked=frozenset(revoked)))
        except RevokedHostKey as exc:
            raise StageError("connect", f"host key of {t.label} ({exc.key.get_name()} "
                             f"{exc.key.fingerprint}) is marked @revoked in {known_hosts}; "
                             "refusing it: give the device a new host key and record that "
                             "one") from None
        except paramiko.BadHostKeyException as exc:
            raise StageError("connect", f"host key of {t.label} does not match known_hosts "
                             f"(got {exc.key.get_name()} {exc.key.fingerprint}): possible "
                             "man-in-the-middle; if the device was reinstalled, remove the old "
                             f"key with `ssh-keygen -R '[{t.hostname}]:{t.port}'`") from None
        except paramiko.AuthenticationException:
            tried = ", ".join(keys) or "ssh-agent and ~/.ssh/id_*"
            only = " only, as IdentitiesOnly is set" if t.identities_only else ""
            raise StageError("connect", f"authentication failed for {t.label} (tried {tried}"
                             f"{only}); pass --identity KEY or add your public key to the "
                             "device's ~/.ssh/authorized_keys") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise StageError("connect", f"{t.label} is not in ~/.ssh/known_hosts; check its "
                                 "fingerprint and pass --accept-new-host-key to record it") from None
            raise StageError("connect", f"SSH to {t.label} failed: {exc}") from None
        except socket.gaierror:
            raise StageError("connect", f"unknown device {t.alias!r}: not `local`, not a Host in "
                             "~/.ssh/config, and its name does not resolve") from None
        except (socket.timeout, TimeoutError):
            raise StageError("connect", f"connecting to {t.label} timed out after "
                             f"{self.connect_timeout_s:.0f}s; is the device up and reachable?") from None
        except OSError as exc:
            raise StageError("connect", f"cannot reach {t.label}: {exc.strerror or exc}; is "
                             "sshd running and the port right?") from None
        self._client = client
        self._watch = _LinkWatch(client.get_transport(), self.stall_timeout_s)
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def _lost(self, stage: str, detail: str) -> StageError:
        """The error for a connection that died; a silent device is named as such."""
        self.close()
        if self._watch is not None and self._watch.lost:
            detail = (f"no answer for {self.stall_timeout_s:.0f}s (the device froze, lost power "
                      "or the network dropped); check the device and retry")
        return StageError(stage, f"connection to {self.target.label} lost: {detail}")

    def execute(self, command: str, stage: str, timeout_s: float,
                stdin: tuple[int, Iterable[bytes]] | bytes | None = None,
                on_stderr=None, heartbeat: bool = False) -> tuple[int, str, str]:
        """Run one remote command under a deadline; returns (exit status, stdout, stderr).
        `stdin`: bytes, or (size, chunks) streamed as they come (see `tar_stream`).
        `heartbeat`: a byte to stdin every second while waiting (the runtime's `--lease`)."""
        try:
            transport = self.connect().get_transport()
            chan = transport.open_session(timeout=self.connect_timeout_s)
            chan.exec_command(command)
            if stdin is not None:
                size, chunks = (len(stdin), [stdin]) if isinstance(stdin, bytes) else stdin
                self._send(chan, chunks, size, stage, timeout_s)
            out, err = bytearray(), bytearray()
            started = time.monotonic()
            deadline, beat = started + timeout_s, started
            while True:
                if heartbeat and time.monotonic() - beat >= 1.0 and chan.send_ready():
                    chan.send(b".")
                    beat = time.monotonic()
                if not chan.exit_status_ready():   # exit status does not wake select: poll
                    select.select([chan], [], [], 0.005 if time.monotonic() - started < 1 else 0.05)
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                    self._watch.alive()
                while chan.recv_stderr_ready():
                    data = chan.recv_stderr(1 << 16)
                    err += data
                    self._watch.alive()
                    if on_stderr:
                        on_stderr(data.decode(errors="replace"))
                if chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    self.close()   # not chan.close(): on a dead link that write would hang
                    raise StageError(stage, f"took longer than {timeout_s:.0f}s on "
                                     f"{self.target.label}; raise the timeout (--timeout)")
            status = chan.recv_exit_status()
            if status == -1 and (self._watch.lost or not transport.is_active()):
                raise self._lost(stage, "the device closed the connection")  # mid-command
            chan.close()
            return status, out.decode(errors="replace"), err.decode(errors="replace")
        except (paramiko.SSHException, EOFError, OSError) as exc:   # incl. socket.timeout
            raise self._lost(stage, str(exc) or type(exc).__name__) from None

    def _send(self, chan, chunks: Iterable[bytes], total: int, stage: str,
              timeout_s: float) -> None:
        """Stream `chunks` under an overall deadline. A watchdog closes the transport when no chunk
        gets through for `stall_timeout_s`: on a dead link paramiko retries a full TCP send
        buffer forever, and closing the transport is what ends that loop. (It also ends a device
        that answers probes but stopped reading, which the link watch cannot see.)"""
        sent = 0
        state = {"last": time.monotonic(), "done": False, "stalled": False}

        def watchdog():     # also ends the upload at Ctrl-C, whichever thread it runs on
            while not state["done"]:
                if time.monotonic() - state["last"] > self.stall_timeout_s \
                        or cancel.requested.is_set():
                    state["stalled"] = not cancel.requested.is_set()
                    chan.get_transport().close()
                    return
                time.sleep(0.1)

        threading.Thread(target=watchdog, daemon=True, name="edgesmith-upload-watchdog").start()
        deadline = time.monotonic() + timeout_s
        try:
            for piece in chunks:
                view = memoryview(piece)
                for start in range(0, len(view), UPLOAD_CHUNK):
                    block = view[start:start + UPLOAD_CHUNK]
                    chan.sendall(block)
                    sent += len(block)
                    state["last"] = time.monotonic()
                    self._watch.alive()
                    if self.on_upload_progress:
                        self.on_upload_progress(sent, total)
                    if sent < total and time.monotonic() > deadline:
                        self.close()
                        raise StageError(stage, f"upload to {self.target.label} did not finish "
                                         f"in {timeout_s:.0f}s ({sent / 1e6:.1f} of "
                                         f"{total / 1e6:.1f} MB sent; slow link?); raise the "
                                         "upload timeout")
            chan.shutdown_write()
        except EdgesmithError:
            self.close()     # a half-sent tar must not be completed by anything else
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if cancel.requested.is_set():
                self.close()
                raise StageError(stage, "interrupted (Ctrl-C); nothing partial is used") from None
            if state["stalled"]:
                self.close()
                raise StageError(stage, f"connection to {self.target.label} lost: no progress "
                                 f"for {self.stall_timeout_s:.0f}s after {sent / 1e6:.1f} of "
                                 f"{total / 1e6:.1f} MB") from None
            raise self._lost(stage, str(exc) or type(exc).__name__) from None
        finally:
            state["done"] = True

    # --- ensure runtime -----------------------------------------------------------------------
    def root(self) -> str:
        """The remote dir as an absolute path: `~`, `~/x` and relative paths are resolved against
        the device user's home once, since uploads and runs `cd` around."""
        if self._root is None:
            base = self.remote_dir
            if base.startswith("~") and base != "~" and not base.startswith("~/"):
                raise StageError("connect", f"remote dir {base!r}: ~user paths are not supported; "
                                 "write an absolute path or one relative to the device's home")
            if base.startswith("/"):
                self._root = base.rstrip("/") or "/"
                return self._root
            _, home, _ = self.execute('printf %s "$HOME"', "connect", 30)
            if not home.startswith("/"):
                raise StageError("connect", f"{self.target.label} reports no absolute $HOME "
                                 f"({home!r}); set an absolute remote dir")
            rel = base[2:] if base.startswith("~/") else "" if base == "~" else base
            self._root = posixpath.join(home, rel).rstrip("/") or "/"
        return self._root

    def ensure_runtime(self) -> RemoteRuntime:
        """Find python, upload device_runtime if missing or stale, read the device's facts."""
        if self._runtime is not None:
            return self._runtime
        files = _runtime_files()
        digest = hashlib.sha256(json.dumps({k: hashlib.sha256(v).hexdigest()
                                            for k, v in files.items()}).encode()).hexdigest()
        root = self.root()
        rt = f"{root}/runtime/{digest[:16]}"
        pythons = [self.python] if self.python else [f"{root}/venv/bin/python3", "python3"]
        probe = (f"for p in {' '.join(q(p) for p in pythons)}; do "
                 'if command -v "$p" >/dev/null 2>&1; then echo "python=$p"; "$p" -c '
                 """'import sys; print("pyver=%d.%d" % sys.version_info[:2])'; break; fi; done; """
                 f"test -f {q(rt)}/.complete && echo runtime=ok; {_sweep(f'{root}/runtime')}; "
                 "command -v timeout >/dev/null 2>&1 && echo timeout=ok; true")
        _, out, _ = self.execute(probe, "ensure-runtime", 60)
        found = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        if "python" not in found:
            raise StageError("ensure-runtime", f"no python3 on {self.target.label} (looked for "
                             f"{pythons}); install python3 there or pass --python PATH")
        python = found["python"]
        version = tuple(int(v) for v in found.get("pyver", "0.0").split("."))
        if version < MIN_DEVICE_PYTHON:
            raise StageError("ensure-runtime", f"{python} on {self.target.label} is Python "
                             f"{found.get('pyver', '?')}; the device runtime needs "
                             f"{'.'.join(map(str, MIN_DEVICE_PYTHON))} or later: install a newer "
                             "python3 there and pass --python PATH")
        if found.get("runtime") != "ok":
            self.upload_files(files, rt, python, "ensure-runtime")
        status, out, err = self.execute(f"PYTHONPATH={q(rt)} {q(python)} -m device_runtime facts",
                                      "ensure-runtime", 120)
        try:
            facts = json.loads(out)
        except ValueError:
            tail = " | ".join(err.strip().splitlines()[-2:])
            raise StageError("ensure-runtime", f"{python} on {self.target.label} cannot run the "
                             f"device runtime (exit {status}): {tail}") from None
        self._runtime = RemoteRuntime(python, rt, facts, found.get("timeout") == "ok")
        return self._runtime

    def missing_packages(self, backend: str) -> list[str]:
        have = self.ensure_runtime().facts.get("packages", {})
        missing = [] if "numpy" in have else ["numpy"]
        wanted = BACKEND_PACKAGES.get(backend, (backend,))
        if not any(p in have for p in wanted):
            missing.append(wanted[0])
        return missing

    # --- upload -------------------------------------------------------------------------------
    def upload_files(self, files: dict[str, bytes | Path], dest: str, python: str,
                     stage: str) -> None:
        """tar over one channel into a temp dir, verify every sha256 there, then rename. Paths
        are streamed from disk. The device removes the temp dir whatever happens to the command
        (a lost race to the same `dest` included); ones a dropped link left behind are swept."""
        parent = posixpath.dirname(dest)
        tmp = f"{parent}/.tmp-{posixpath.basename(dest)}-{os.urandom(4).hex()}"
        hashes = {name: hashlib.sha256(data).hexdigest() if isinstance(data, bytes)
                  else sha256_file(data) for name, data in files.items()}
        # one round trip: sweep, unpack, check every sha256 on the device, mark complete, rename;
        # tar under the upload's own deadline: on a dark link the device never sees the host
        # go, and the stuck tar kept its temp dir until the next push's sweep an hour later
        limit = f"timeout -k 5 {int(self.upload_timeout_s) + 5}"
        command = (f"t=; command -v timeout >/dev/null 2>&1 && t={q(limit)}; "
                   f"{_sweep(parent)}; mkdir -p {q(tmp)} && {{ $t tar -xf - -C {q(tmp)} && "
                   f"(cd {q(tmp)} && {q(python)} -c {q(VERIFY_SNIPPET)} {q(json.dumps(hashes))}) "
                   f"&& touch {q(tmp)}/.complete && {{ mv -T {q(tmp)} {q(dest)} 2>/dev/null || "
                   f"test -f {q(dest)}/.complete; }}; }}; status=$?; rm -rf {q(tmp)}; exit $status")
        status, out, err = self.execute(command, stage, self.upload_timeout_s,
                                        stdin=tar_stream(files))
        if status == 0 and out.strip() == "[]":
            return
        if any(text in out + err for text in NO_SPACE):
            raise StageError(stage, f"no space left on {self.target.label} under {parent} (disk "
                             "or quota full); free some (old bundles can go) or set a remote dir "
                             "on a bigger disk")
        detail = out.strip() if out.strip() not in ("", "[]") else \
            (err.strip().splitlines() or [f"exit {status}"])[-1]
        raise StageError(stage, f"upload to {self.target.label} failed its check on the "
                         f"device ({detail}); nothing partial is used — retry the push")

    def push(self, bundle: Bundle) -> str:
        """Upload a bundle unless the device holds it already; returns its remote path."""
        runtime = self.ensure_runtime()
        dest = f"{self.root()}/bundles/{bundle.id}"
        bundles = f"{self.root()}/bundles"   # also sweep temp dirs that dropped links left behind
        status, _, _ = self.execute(
            f"test -f {q(dest)}/.complete; found=$?; {_sweep(bundles)}; exit $found", "upload", 60)
        if status == 0:
            return dest
        files = {p.name: p for p in sorted(bundle.path.iterdir()) if p.is_file()}
        first = None             # a dropped link is retried once on a fresh connection
        for attempt in (1, 2):
            try:
                self.upload_files(files, dest, runtime.python, "upload")
                return dest
            except StageError as exc:
                if first is not None:   # say what went wrong first: the stall, not the retry
                    raise StageError(first.stage, f"{first.message}; retrying failed too "
                                     f"({exc.stage}: {exc.message})") from None
                if "connection" not in exc.message or cancel.requested.is_set():
                    raise
                first = exc
                self.close()
        return dest

    def forget(self, remote_path: str) -> None:
        """Drop a remote bundle that failed verification, so the next push uploads it anew."""
        self.execute(f"rm -rf {q(remote_path)}", "cleanup", 60)

    # --- run ----------------------------------------------------------------------------------
    def run(self, remote_path: str, job: Job) -> Result:
        try:
            runtime = self.ensure_runtime()
            missing = self.missing_packages(job.backend)
            if missing:
                return Result.failure("ensure-runtime", f"{runtime.python} on {self.target.label} "
                                      f"lacks {', '.join(missing)}; run `edgesmith device setup "
                                      f"{self.name}` or pip install them there",
                                      device=runtime.facts)
            limit = job.timeout_s + job.lock_timeout_s
            status, out, err = self._timed(runtime, ["run", remote_path], job, limit)
        except StageError as exc:
            return Result.failure(exc.stage, exc.message)
        if runtime.has_timeout and status == 124:
            return Result.failure("run", f"the device runtime took longer than {limit:.0f}s; "
                                  "raise the timeout (--timeout)", device=runtime.facts)
        return parse_result(out, err, status)

    def facts(self) -> dict:
        return self.ensure_runtime().facts

    def fetch(self, remote_path: str, local_path: Path) -> None:
        """A file the runtime wrote on the device, over SFTP on the checked connection, to a
        temp file renamed to `local_path` when whole."""
        local_path = Path(local_path)
        tmp = local_path.with_name(f".{local_path.name}.{os.getpid()}.part")
        try:
            with self.connect().open_sftp() as sftp:
                sftp.get(remote_path, str(tmp))
            os.replace(tmp, local_path)
        except (OSError, paramiko.SSHException) as exc:
            raise self._lost("fetch", str(exc) or type(exc).__name__) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _timed(self, runtime: RemoteRuntime, args: list[str], job: Job,
               limit: float) -> tuple[int, str, str]:
        """A timing command of the runtime (`run`, `compare`): under the device's benchmark
        lock, on a lease the heartbeat keeps, bounded by `limit` on the device too."""
        argv = " ".join(q(a) for a in ["-m", "device_runtime", *args, *job.argv(),
                                       "--lock", f"{self.root()}/device.lock",
                                       "--lock-timeout", str(job.lock_timeout_s),
                                       "--lease", f"{self.stall_timeout_s + LEASE_MARGIN_S:g}"])
        guard = f"timeout -k 5 {int(limit)} " if runtime.has_timeout else ""
        return self.execute(f"cd {q(self.root())} && PYTHONPATH={q(runtime.path)} "
                            f"{guard}{q(runtime.python)} {argv}", "run", limit + 10,
                            on_stderr=_show_waiting, heartbeat=True)

    def compare(self, paths: list[str], job: Job, rounds: int) -> dict:
        """`paths` timed in rotating rounds in one runtime process under the device's lock,
        on a lease like `run`."""
        runtime = self.ensure_runtime()
        limit = job.timeout_s * len(paths) * rounds + job.lock_timeout_s
        status, out, err = self._timed(runtime, ["compare", *paths, "--rounds", str(rounds)],
                                       job, limit)
        if runtime.has_timeout and status == 124:
            raise StageError("run", f"the device runtime took longer than {limit:.0f}s")
        return parse_reply(out, err, status, "run")

    def call(self, args: list[str], stage: str, timeout_s: float = 600.0) -> dict:
        """`python3 -m device_runtime ARGS` on the device (every argument quoted); its JSON
        reply. The device's benchmark lock is passed to commands that time a model, with a
        lease the heartbeat keeps: a deploy orphaned by a dark link ends, and frees the lock."""
        runtime = self.ensure_runtime()
        deploying = bool(args) and args[0] == "deploy"
        if deploying:     # its check times under the lock: on a lease, as `run` is
            args = [*args, "--bench-lock", f"{self.root()}/device.lock",
                    "--lease", f"{self.stall_timeout_s + LEASE_MARGIN_S:g}"]
        argv = " ".join(q(a) for a in ["-m", "device_runtime", *args])
        guard = f"timeout -k 5 {int(timeout_s)} " if runtime.has_timeout else ""
        status, out, err = self.execute(f"cd {q(self.root())} && PYTHONPATH={q(runtime.path)} "
                                        f"{guard}{q(runtime.python)} {argv}", stage,
                                        timeout_s + 10, on_stderr=_show_waiting,
                                        heartbeat=deploying)
        if runtime.has_timeout and status == 124:
            raise StageError(stage, f"the device runtime took longer than {timeout_s:.0f}s")
        return parse_reply(out, err, status, stage)


def _show_waiting(text: str) -> None:
    for line in text.splitlines():
        if line.startswith("waiting for"):
            print(line, file=sys.stderr, flush=True)
