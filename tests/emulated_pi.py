"""An emulated Raspberry Pi: Debian bookworm arm64 under qemu-user, its sshd in a network namespace.

`build()` makes the rootfs once and caches it (under /var/cache/edgesmith/emulated-pi): debootstrap
arm64 with python3, python3-venv and openssh-server, then the device's own venv at
`/root/.edgesmith/venv` (where `edgesmith device setup` puts it), filled offline from aarch64 wheels
the host downloads (`pip download --platform`), so pip in the chroot never needs the network (nor
the host's CA bundle). The wheels stay in the rootfs for tests of `device setup --wheels`.

onnxruntime is pinned to 1.27 on the device: 1.28 and later segfault at import under bookworm's
qemu 7.2. The host runs a newer one, which is exactly the version skew users meet.

`EmulatedPi` starts a run: a throw-away overlay over the cached rootfs (a run never changes the
cache), /proc and /dev mounted into it, and the rootfs's own sshd, chrooted, inside a network
namespace (`netns.NetnsHost`). Teardown undoes all of it, including the binfmt entry and the
binfmt_misc mount if they were made here.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import NetnsHost, sh  # noqa: E402

CACHE = Path(os.environ.get("EDGESMITH_PI_CACHE", "/var/cache/edgesmith/emulated-pi"))
SUITE = "bookworm"
APT_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap")
CHROOT_PACKAGES = ("python3", "python3-venv", "openssh-server")
DEVICE_WHEELS = ("numpy", "onnxruntime==1.27.0", "ai-edge-litert")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
VENV = "/root/.edgesmith/venv"
COMPLETE = ".edgesmith-complete"     # written last: a rootfs without it is not used
WHEELS = "opt/device-wheels"         # kept in the rootfs: tests push them with `device setup`


def recipe_key() -> str:
    """The cache key: anything that changes what is built changes the directory name."""
    text = repr((SUITE, CHROOT_PACKAGES, DEVICE_WHEELS, PLATFORMS, WHEELS))
    return f"{SUITE}-arm64-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def cached_rootfs() -> Path:
    return CACHE / recipe_key()


def missing_tools() -> list[str]:
    tools = {"qemu-user-static": "/usr/bin/qemu-aarch64-static",
             "debootstrap": "/usr/sbin/debootstrap", "binfmt-support": "/usr/sbin/update-binfmts"}
    return [pkg for pkg, path in tools.items() if not Path(path).exists()]


def install_tools() -> None:
    missing = missing_tools()
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                       capture_output=True, timeout=900)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (one-line or deb822 sources)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        text = path.read_text() if path.is_file() else ""
        for uri in re.findall(r"^\s*URIs:\s*(\S+)", text, re.M) + \
                re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


class Binfmt:
    """qemu-aarch64 registered with binfmt_misc while any emulated-Pi user runs.

    binfmt_misc is machine-wide: every user holds a shared flock on LOCK; the last one out (its
    exclusive lock succeeds) undoes what an edgesmith run added (recorded in ADDED), and nothing
    else, so concurrent runs never pull the interpreter from under each other.
    """

    LOCK, ADDED = Path("/run/edgesmith-binfmt.lock"), Path("/run/edgesmith-binfmt.added")

    def __init__(self):
        self.fd: int | None = None

    def __enter__(self) -> Binfmt:
        self.fd = os.open(self.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)          # registering is not concurrent
        added = []
        if not (BINFMT / "status").exists():
            sh("mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT))
            added.append("mount")
        if not (BINFMT / "qemu-aarch64").exists():
            sh("update-binfmts", "--enable", "qemu-aarch64")
            added.append("entry")
        if added:
            self.ADDED.write_text(" ".join(added))
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # only if nobody else is in
        except BlockingIOError:
            pass
        else:
            added = self.ADDED.read_text().split() if self.ADDED.exists() else []
            if "entry" in added:
                sh("update-binfmts", "--disable", "qemu-aarch64", check=False)
            if "mount" in added:
                sh("umount", str(BINFMT), check=False)
            self.ADDED.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def build(log=print) -> Path:
    """Build the cached rootfs if it is not there yet; return its path. Cold: 7-10 min."""
    final = cached_rootfs()
    if (final / COMPLETE).exists():
        return final
    install_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    for stale in CACHE.glob(f"{final.name}.*"):   # a build killed hard hours ago
        if time.time() - stale.stat().st_mtime > 3 * 3600:
            remove_tree(stale)
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}.", dir=CACHE))   # renamed when complete
    try:
        with Binfmt():
            log(f"debootstrap {SUITE} arm64 into {work} (a few minutes)")
            step("debootstrap", ["debootstrap", "--arch=arm64", "--variant=minbase",
                                 f"--include={','.join(CHROOT_PACKAGES)}", SUITE, str(work),
                                 debian_mirror()], 3600, work / "debootstrap" / "debootstrap.log")
            wheels = work / WHEELS
            log("downloading aarch64 wheels for the device venv on the host")
            step("pip download", [sys.executable, "-m", "pip", "download", "-q",
                                  "--only-binary=:all:", *[f"--platform={p}" for p in PLATFORMS],
                                  "--python-version=3.11", "--implementation=cp", "-d",
                                  str(wheels), *DEVICE_WHEELS], 1800)
            log(f"installing {', '.join(DEVICE_WHEELS)} into {VENV} under emulation")
            chroot(work, f"python3 -m venv --system-site-packages {VENV} && "
                         f"{VENV}/bin/python3 -m pip install -q --isolated --no-index "
                         f"--find-links /{WHEELS} {' '.join(DEVICE_WHEELS)}", timeout=3600)
        (work / COMPLETE).write_text(recipe_key() + "\n")
        os.chmod(work, 0o755)
        try:
            work.rename(final)
        except OSError:   # another run finished the same build first: use theirs
            if not (final / COMPLETE).exists():
                raise
            remove_tree(work)
    except BaseException:
        remove_tree(work)
        raise
    return final


def step(what: str, argv: list[str], timeout: float, log: Path | None = None) -> None:
    """A build step; its failure says what failed and the last lines it (or its log) printed."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        text = log.read_text(errors="replace") if log and log.is_file() else done.stderr
        tail = " | ".join(text.strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {tail}")


def unmount_below(path: Path) -> None:
    """Lazily unmount everything mounted at or under `path`, deepest first."""
    base = str(path.resolve())
    points = [line.split()[1].encode().decode("unicode_escape")
              for line in Path("/proc/self/mounts").read_text().splitlines()]
    for point in sorted((p for p in points if p == base or p.startswith(base + "/")),
                        key=len, reverse=True):
        sh("umount", "-l", point, check=False)


def remove_tree(path: Path) -> None:
    """rmtree, but never into a mount (a bound /dev or /proc would be emptied on the host)."""
    unmount_below(path)
    shutil.rmtree(path, ignore_errors=True)


def chroot(root: Path, command: str, timeout: float = 600) -> str:
    """Run a shell command in the rootfs (proc mounted for the duration)."""
    proc = root / "proc"
    sh("mount", "-t", "proc", "proc", str(proc))
    try:
        done = subprocess.run(["chroot", str(root), "/bin/sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                                   "LC_ALL": "C.UTF-8"})
    finally:
        sh("umount", "-l", str(proc), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"in the chroot `{command}` failed: {done.stderr[-800:]}")
    return done.stdout


class EmulatedPi:
    """A running emulated Pi: `destination`, `known_hosts_line()`, `sshd.client_key`."""

    def __init__(self, workdir: Path, index: int):
        self.workdir, self.index = workdir, index
        self.root = workdir / "root"
        self.binfmt = Binfmt()
        self.host: NetnsHost | None = None

    def start(self) -> "EmulatedPi":
        lower = build()
        self.binfmt.__enter__()
        upper, scratch = self.workdir / "upper", self.workdir / "overlay-work"
        for d in (upper, scratch, self.root):
            d.mkdir(parents=True, exist_ok=True)
        self._mount(self.root, "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={scratch}")
        self._mount(self.root / "proc", "-t", "proc", "proc")
        self._mount(self.root / "dev", "--bind", "/dev")
        self.host = NetnsHost(self.root / "etc" / "edgesmith-test-sshd", self.index,
                              root=self.root)
        self.host.start(wait_s=60)              # the chrooted sshd itself runs under qemu
        return self

    def _mount(self, target: Path, *args: str) -> None:
        sh("mount", *args, str(target))

    @property
    def destination(self) -> str:
        return self.host.destination

    @property
    def wheels(self) -> Path:
        """The device's aarch64 wheels, as the host sees them."""
        return cached_rootfs() / WHEELS

    def known_hosts_line(self) -> str:
        return self.host.known_hosts_line()

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()
        self.binfmt.__exit__(None, None, None)
        remove_tree(self.workdir)
