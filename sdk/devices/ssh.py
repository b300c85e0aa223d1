"""SSH devices (paramiko), staged like TVM's RPC runner: connect -> ensure runtime -> upload ->
run -> cleanup, each timed and under its own timeout. Host keys are always checked.

Every remote path and argument goes through `shlex.quote`. Uploads are content-addressed
(`<remote dir>/bundles/<sha256>/`), written to a temporary name, verified on the device, then
renamed, so a dropped link never leaves a half bundle that is later used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import select
import shlex
import socket
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

import device_runtime
from device_runtime.result import Result

from ..bundle import Bundle
from ..errors import EdgesmithError, StageError
from . import Job, parse_result

q = shlex.quote
RUNTIME_SRC = Path(device_runtime.__file__).resolve().parent
DEFAULT_REMOTE_DIR = "~/.edgesmith"
MIN_DEVICE_PYTHON = (3, 8)     # device_runtime's oldest (importlib.metadata); tested with 3.8
BACKEND_PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                    "tflite": ("ai-edge-litert", "tflite-runtime")}
# run on the device to check uploaded files against their sha256 (argv[1]: {path: sha256})
VERIFY_SNIPPET = (
    "import hashlib,json,sys\n"
    "bad=[p for p,h in json.loads(sys.argv[1]).items()"
    " if hashlib.sha256(open(p,'rb').read()).hexdigest()!=h]\n"
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

    @property
    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _ssh_config() -> paramiko.SSHConfig:
    path = Path(os.path.expanduser("~/.ssh/config"))
    return paramiko.SSHConfig.from_path(str(path)) if path.is_file() else paramiko.SSHConfig()


def resolve(destination: str, identity: str | None = None) -> SSHTarget:
    """`user@host[:port]`, `user@[v6addr]:port` or a Host alias from ~/.ssh/config."""
    m = re.fullmatch(r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))"
                     r"(?::(?P<port>\d+))?", destination)
    if not m:
        raise EdgesmithError(f"bad device {destination!r}; write `local`, user@host[:port] "
                             "or a Host alias from ~/.ssh/config")
    host = m.group("v6") or m.group("host")
    cfg = _ssh_config().lookup(host)
    user = m.group("user") or cfg.get("user") or os.environ.get("USER") or "root"
    port = int(m.group("port") or cfg.get("port") or 22)
    identities = [identity] if identity else [os.path.expanduser(p)
                                              for p in cfg.get("identityfile", [])]
    proxy = cfg.get("proxycommand")
    if cfg.get("proxyjump") and not proxy:  # ProxyJump host[:port] == ProxyCommand ssh -W
        proxy = f"ssh -W %h:%p {cfg['proxyjump']}"
    hostname = cfg.get("hostname", host)
    if proxy:
        proxy = proxy.replace("%h", hostname).replace("%p", str(port)).replace("%r", user)
    return SSHTarget(host, hostname, user, port, identities, proxy)


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


def _fast_cipher_first(*args, **kwargs) -> paramiko.Transport:
    """AES-GCM moves ~25% more bytes per second than paramiko's default AES-CTR+HMAC; prefer
    it, keeping every other cipher so old servers (dropbear) still connect."""
    transport = paramiko.Transport(*args, **kwargs)
    options = transport.get_security_options()
    gcm = tuple(c for c in options.ciphers if c.endswith("-gcm@openssh.com"))
    options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)
    return transport


def _runtime_files() -> dict[str, bytes]:
    return {str(p.relative_to(RUNTIME_SRC.parent)): p.read_bytes()
            for p in sorted(RUNTIME_SRC.rglob("*.py"))}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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
                 stall_timeout_s: float = 30.0, name: str | None = None):
        self.target, self.accept_new = target, accept_new_host_key
        self.python = python
        self.remote_dir = remote_dir or os.environ.get("EDGESMITH_REMOTE_DIR", DEFAULT_REMOTE_DIR)
        self.connect_timeout_s, self.upload_timeout_s = connect_timeout_s, upload_timeout_s
        self.stall_timeout_s = stall_timeout_s     # no progress this long: the link is gone
        self.name = name or target.alias
        self.on_upload_progress = None   # callable(sent_bytes, total_bytes), e.g. a progress bar
        self._client: paramiko.SSHClient | None = None
        self._runtime: RemoteRuntime | None = None
        self._root: str | None = None

    @classmethod
    def from_destination(cls, destination: str, identity: str | None = None, **options):
        options.setdefault("name", destination)
        return cls(resolve(destination, identity), **options)

    # --- connect ------------------------------------------------------------------------------
    def connect(self) -> paramiko.SSHClient:
        if self._client is not None and self._client.get_transport() is not None \
                and self._client.get_transport().is_active():
            return self._client
        t = self.target
        known_hosts = Path(os.path.expanduser("~/.ssh/known_hosts"))
        client = paramiko.SSHClient()
        client.load_system_host_keys()
        if known_hosts.is_file():
            client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(_RecordNewHostKey(known_hosts) if self.accept_new
                                           else paramiko.RejectPolicy())
        sock = paramiko.ProxyCommand(t.proxy_command) if t.proxy_command else None
        try:
            client.connect(t.hostname, port=t.port, username=t.user,
                           key_filename=t.identity_files or None, timeout=self.connect_timeout_s,
                           banner_timeout=self.connect_timeout_s,
                           auth_timeout=self.connect_timeout_s, sock=sock,
                           transport_factory=_fast_cipher_first)
        except paramiko.BadHostKeyException as exc:
            raise StageError("connect", f"host key of {t.label} does not match known_hosts "
                             f"(got {exc.key.get_name()} {exc.key.fingerprint}): possible "
                             "man-in-the-middle; if the device was reinstalled, remove the old "
                             f"key with `ssh-keygen -R '[{t.hostname}]:{t.port}'`") from None
        except paramiko.AuthenticationException:
            tried = ", ".join(t.identity_files) or "ssh-agent and ~/.ssh/id_*"
            raise StageError("connect", f"authentication failed for {t.label} (tried {tried}); "
                             "pass --identity KEY or add your public key to the device's "
                             "~/.ssh/authorized_keys") from None
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
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def execute(self, command: str, stage: str, timeout_s: float, stdin: bytes | None = None,
              on_stderr=None) -> tuple[int, str, str]:
        """Run one remote command under a deadline; returns (exit status, stdout, stderr)."""
        try:
            transport = self.connect().get_transport()
            chan = transport.open_session(timeout=self.connect_timeout_s)
            chan.exec_command(command)
            if stdin is not None:
                self._send(chan, stdin, stage, timeout_s)
            out, err = bytearray(), bytearray()
            started = time.monotonic()
            deadline = started + timeout_s
            while True:
                if not chan.exit_status_ready():   # exit status does not wake select: poll
                    select.select([chan], [], [], 0.005 if time.monotonic() - started < 1 else 0.05)
                while chan.recv_ready():
                    out += chan.recv(1 << 16)
                while chan.recv_stderr_ready():
                    data = chan.recv_stderr(1 << 16)
                    err += data
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
            chan.close()
            return status, out.decode(errors="replace"), err.decode(errors="replace")
        except (paramiko.SSHException, EOFError, OSError) as exc:   # incl. socket.timeout
            self.close()
            raise StageError(stage, f"connection to {self.target.label} lost: "
                             f"{exc or type(exc).__name__}") from None

    def _send(self, chan, data: bytes, stage: str, timeout_s: float) -> None:
        """Stream `data` under an overall deadline. A watchdog closes the transport when no chunk
        gets through for `stall_timeout_s`: on a dead link paramiko retries a full TCP send
        buffer forever, and closing the transport is what ends that loop."""
        import threading

        view, sent, chunk = memoryview(data), 0, 1 << 18
        state = {"last": time.monotonic(), "done": False, "stalled": False}

        def watchdog():
            while not state["done"]:
                if time.monotonic() - state["last"] > self.stall_timeout_s:
                    state["stalled"] = True
                    chan.get_transport().close()
                    return
                time.sleep(0.2)

        threading.Thread(target=watchdog, daemon=True, name="edgesmith-upload-watchdog").start()
        deadline = time.monotonic() + timeout_s
        try:
            while sent < len(data):
                chan.sendall(view[sent:sent + chunk])
                sent = min(sent + chunk, len(data))
                state["last"] = time.monotonic()
                if self.on_upload_progress:
                    self.on_upload_progress(sent, len(data))
                if sent < len(data) and time.monotonic() > deadline:
                    self.close()
                    raise StageError(stage, f"upload to {self.target.label} did not finish in "
                                     f"{timeout_s:.0f}s ({sent / 1e6:.1f} of "
                                     f"{len(data) / 1e6:.1f} MB sent; slow link?); raise the "
                                     "upload timeout")
            chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.close()
            if state["stalled"]:
                raise StageError(stage, f"connection to {self.target.label} lost: no progress "
                                 f"for {self.stall_timeout_s:.0f}s after {sent / 1e6:.1f} of "
                                 f"{len(data) / 1e6:.1f} MB") from None
            raise StageError(stage, f"connection to {self.target.label} lost: "
                             f"{exc or type(exc).__name__}") from None
        finally:
            state["done"] = True

    # --- ensure runtime -----------------------------------------------------------------------
    def root(self) -> str:
        if self._root is None:
            _, home, _ = self.execute('printf %s "$HOME"', "connect", 30)
            base = self.remote_dir
            self._root = home + base[1:] if base.startswith("~") else base
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
                 f"test -f {q(rt)}/.complete && echo runtime=ok; "
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
    def upload_files(self, files: dict[str, bytes], dest: str, python: str, stage: str) -> None:
        """tar over one channel into a temp dir, verify every sha256 there, then rename."""
        tmp = f"{os.path.dirname(dest)}/.tmp-{os.path.basename(dest)}-{os.urandom(4).hex()}"
        hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        # one round trip: unpack, check every sha256 on the device, mark complete, rename
        command = (f"mkdir -p {q(tmp)} && tar -xf - -C {q(tmp)} && cd {q(tmp)} && "
                   f"{q(python)} -c {q(VERIFY_SNIPPET)} {q(json.dumps(hashes))} && "
                   f"touch .complete && cd .. && (mv -T {q(tmp)} {q(dest)} 2>/dev/null || "
                   f"test -f {q(dest)}/.complete)")
        try:
            status, out, err = self.execute(command, stage, self.upload_timeout_s,
                                            stdin=_tar(files))
            if status != 0 or out.strip() != "[]":
                detail = out.strip() if out.strip() not in ("", "[]") else \
                    (err.strip().splitlines() or [f"exit {status}"])[-1]
                raise StageError(stage, f"upload to {self.target.label} failed its check on the "
                                 f"device ({detail}); nothing partial is used — retry the push")
        except StageError as exc:
            if self._client is not None and "lost" not in exc.message:
                try:   # best effort; never on a dead link, and stale temp dirs are never read
                    self.execute(f"rm -rf {q(tmp)}", "cleanup", 60)
                except StageError:
                    pass
            raise

    def push(self, bundle: Bundle) -> str:
        """Upload a bundle unless the device holds it already; returns its remote path."""
        runtime = self.ensure_runtime()
        dest = f"{self.root()}/bundles/{bundle.id}"
        bundles = f"{self.root()}/bundles"   # also sweep temp dirs that dropped links left behind
        status, _, _ = self.execute(
            f"test -f {q(dest)}/.complete; found=$?; find {q(bundles)} -maxdepth 1 -name "
            f"'.tmp-*' -mmin +60 -exec rm -rf {{}} + 2>/dev/null; exit $found", "upload", 60)
        if status == 0:
            return dest
        files = {p.name: p.read_bytes() for p in sorted(bundle.path.iterdir()) if p.is_file()}
        for attempt in (1, 2):   # a dropped link is retried once on a fresh connection
            try:
                self.upload_files(files, dest, runtime.python, "upload")
                return dest
            except StageError as exc:
                if attempt == 2 or "connection" not in exc.message:
                    raise
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
            argv = " ".join(q(a) for a in ["-m", "device_runtime", "run", remote_path,
                                           *job.argv(), "--lock", f"{self.root()}/device.lock",
                                           "--lock-timeout", str(job.lock_timeout_s)])
            limit = job.timeout_s + job.lock_timeout_s
            guard = f"timeout -k 5 {int(limit)} " if runtime.has_timeout else ""
            status, out, err = self.execute(f"cd {q(self.root())} && PYTHONPATH={q(runtime.path)} "
                                          f"{guard}{q(runtime.python)} {argv}", "run", limit + 10,
                                          on_stderr=_show_waiting)
        except StageError as exc:
            return Result.failure(exc.stage, exc.message)
        if runtime.has_timeout and status == 124:
            return Result.failure("run", f"the device runtime took longer than {limit:.0f}s; "
                                  "raise the timeout (--timeout)", device=runtime.facts)
        return parse_result(out, err, status)

    def facts(self) -> dict:
        return self.ensure_runtime().facts


def _show_waiting(text: str) -> None:
    for line in text.splitlines():
        if line.startswith("waiting for"):
            print(line, file=sys.stderr, flush=True)
