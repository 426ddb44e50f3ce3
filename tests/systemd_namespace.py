"""A throwaway systemd, PID 1 of its own namespaces, for integration tests.

It follows the recipe in shared/notes/systemd-in-a-namespace.md: a private
/run, and every unit of sysinit.target and local-fs.target masked, so its boot
touches nothing of the host (tmpfiles would empty the host's /tmp). On top of
the recipe:

- a cgroup namespace rooted in a cgroup made for it, with cgroup2 mounted on
  /sys/fs/cgroup, so its slices and services (and ipad's delegated subtree)
  live below that cgroup and not at the root of the host's hierarchy;
- its own /tmp and /var/tmp (tmpfs), so PrivateTmp= directories of its services
  are made there, not in the host's; host paths below them that the tests need
  (a checkout in /tmp) are bound in;
- an overlay on /etc whose upper layer is in its /run, so systemd-sysusers can
  create ipad's user and the units can be installed into /etc/systemd/system
  as docs/operations.md says, without changing the host's /etc;
- systemd logs to the namespace's journald, not to the host's kernel log.

``stop`` kills its PID 1 with SIGKILL, which ends every process in the
namespace, and removes its cgroups; the fixtures call it even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ipad.daemon.cgroup import cgroup2_mount, own_cgroup
from tests.journal_reader import JournalReader

SYSTEMD = "/lib/systemd/systemd"
NSENTER = shutil.which("nsenter") or "nsenter"
UNSHARE = shutil.which("unshare") or "unshare"

#: Booting a minimal target takes well under a second here; a loaded CI machine gets more.
BOOT_TIMEOUT = 30.0


def missing_requirements() -> str | None:
    """Why a namespaced systemd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "booting systemd in new namespaces needs root"
    for tool in (SYSTEMD, NSENTER, UNSHARE, shutil.which("systemctl"), shutil.which("journalctl")):
        if tool is None or not Path(tool).exists():
            return (
                f"needs systemd 252 or later, nsenter and unshare ({tool or 'systemctl'} missing)"
            )
    if Path("/run/systemd/system").exists():
        return "systemd runs on this host: test it there instead of in a namespace"
    if cgroup2_mount() is None or own_cgroup() is None:
        return "needs a cgroup2 hierarchy for the namespace's cgroups"
    return None


#: Run inside the new namespaces, then exec systemd. $1 is the staging directory.
BOOT = r"""
set -e
stage=$1
mount -t tmpfs -o mode=0755 tmpfs /run
cp "$stage/keep" /run/keep
for t in /tmp /var/tmp; do                # private, but for the host paths listed in keep
  mkdir -p /run/host$t && mount --bind $t /run/host$t && mount -t tmpfs -o mode=1777 tmpfs $t
done
while read -r p; do mkdir -p "$p" && mount --bind "/run/host$p" "$p"; done < /run/keep
umount /run/host/tmp /run/host/var/tmp
umount -R /sys/fs/cgroup         # the host's view (v1 controllers, a hybrid unified/): not ours
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /run/etc-overlay/upper /run/etc-overlay/work
mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/etc-overlay/upper,workdir=/run/etc-overlay/work /etc
U=/run/systemd/system; mkdir -p $U
for d in /lib/systemd/system/sysinit.target.wants /etc/systemd/system/sysinit.target.wants /lib/systemd/system/local-fs.target.wants; do
  for u in $(ls $d 2>/dev/null); do ln -sf /dev/null $U/$u; done
done
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service systemd-tmpfiles-setup-dev.service \
         systemd-remount-fs.service systemd-journal-flush.service systemd-sysusers.service systemd-sysctl.service \
         systemd-binfmt.service tmp.mount local-fs.target swap.target; do ln -sf /dev/null $U/$u; done
rm -f $U/systemd-journald.service          # keep journald itself: it writes only to /run/log/journal here
printf '[Unit]\nDescription=test root\nWants=systemd-journald.socket systemd-journald.service\n' > $U/test.target
sh "$stage/setup.sh"
exec /lib/systemd/systemd --system --unit=test.target --log-target=journal
"""

#: Run in the host's mount namespace: join the cgroup made for the namespace, then unshare.
ENTER = (
    'echo $$ > "$1/cgroup.procs" && exec "$2" --pid --fork --mount --uts --ipc $5 --cgroup '
    '--mount-proc --propagation private /bin/sh -c "$3" boot "$4"'
)


class SystemdNamespace:
    """systemd as PID 1 of new PID, mount, cgroup, UTS, IPC and network namespaces.

    ``files`` are written into the namespace before systemd starts (absolute
    paths: /etc lands in the overlay, /run in its tmpfs); ``setup`` is shell run
    after that, as root, inside the namespace. ``keep`` are host directories
    below /tmp or /var/tmp to see in the namespace too. With ``network`` it
    shares the host's network namespace (to install packages, say).
    """

    def __init__(
        self,
        files: Mapping[str, str],
        setup: str = "",
        keep: Sequence[Path] = (),
        *,
        network: bool = False,
    ) -> None:
        self.network = network
        self.stage = Path(tempfile.mkdtemp(prefix="ipad-systemd-"))
        (self.stage / "keep").write_text("".join(f"{p}\n" for p in [self.stage, *keep]))
        self.cgroup = self._make_cgroup()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        try:
            self._boot(files, setup)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _make_cgroup() -> Path:
        mount, own = cgroup2_mount(), own_cgroup()
        assert mount is not None  # missing_requirements() said so
        assert own is not None
        path = mount / own.lstrip("/") / f"ipad-systemd-test.{os.getpid()}.{time.monotonic_ns()}"
        path.mkdir()
        return path

    def _boot(self, files: Mapping[str, str], setup: str) -> None:
        outside = [t for t in files if not t.startswith(("/etc/", "/run/"))]
        if outside:  # anywhere else is the host's own file system
            raise ValueError(f"only /etc and /run are private to the namespace, not {outside}")
        copies = []
        for number, (target, content) in enumerate(files.items()):
            source = self.stage / f"file{number}"
            source.write_text(content)
            copies.append(f"mkdir -p {shlex.quote(str(Path(target).parent))}")
            copies.append(f"cp {source} {shlex.quote(target)}")
        (self.stage / "setup.sh").write_text("set -e\n" + "\n".join(copies) + "\n" + setup + "\n")
        self.stage.chmod(0o755)
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", ENTER, "enter", str(self.cgroup), UNSHARE, BOOT, str(self.stage),
             "" if self.network else "--net"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.pid:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                found = children.read_text().split()
                if found and Path(f"/proc/{found[0]}/exe").resolve() == Path(SYSTEMD).resolve():
                    self.pid = int(found[0])
            self._check_alive(deadline)
            time.sleep(0.01)
        while self.run("systemctl", "is-system-running", check=False).stdout.strip() not in (
            "running", "degraded",
        ):  # fmt: skip
            self._check_alive(deadline)
            time.sleep(0.05)
        self.journal = JournalReader([], prefix=self.enter())

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None  # started by _boot
        if self.proc.poll() is not None:
            stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"the namespace's systemd exited at boot: {stderr}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the namespace's systemd did not boot in {BOOT_TIMEOUT:g}s")

    @property
    def root(self) -> Path:
        """The namespace's file system, seen from the host (its /run, its /etc overlay)."""
        return Path(f"/proc/{self.pid}/root")

    def enter(self) -> list[str]:
        """A command prefix that runs the rest in every namespace of the instance."""
        return [NSENTER, "-t", str(self.pid), "-a"]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespaces; with ``check``, fail with its output."""
        result = subprocess.run([*self.enter(), *argv], capture_output=True, text=True,
                                timeout=timeout, check=False)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{argv} exited {result.returncode}: {result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> str:
        """``systemctl ARGS`` inside; its output."""
        return self.run("systemctl", *args, check=check).stdout.strip()

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -p PROP --value``)."""
        return self.systemctl("show", "-p", prop, "--value", unit)

    def host_pid(self, ns_pid: int) -> int:
        """The host's pid of a process the namespace knows as ``ns_pid``."""
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                for line in status.read_text().splitlines():
                    if line.startswith("NSpid:"):
                        pids = line.split()[1:]
                        if len(pids) > 1 and pids[-1] == str(ns_pid) and self._ours(status.parent):
                            return int(pids[0])
        raise AssertionError(f"no process {ns_pid} in the namespace")

    def _ours(self, proc: Path) -> bool:
        try:
            return (proc / "ns/pid").readlink() == Path(f"/proc/{self.pid}/ns/pid").readlink()
        except OSError:
            return False

    def processes(self) -> list[str]:
        """The command line of every process in the namespace (host view)."""
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            if self._ours(proc):
                with contextlib.suppress(OSError):
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        return found

    def stop(self) -> None:
        """Kill PID 1 (and with it every process inside), reap it, remove its cgroups."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            if self.proc.poll() is None and not self.pid:
                self.proc.kill()
            self.proc.wait(timeout=BOOT_TIMEOUT)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        _remove_cgroup_tree(self.cgroup)
        shutil.rmtree(self.stage, ignore_errors=True)


def _remove_cgroup_tree(top: Path) -> None:
    """Kill anything left in ``top`` (and below), wait for it to empty, remove it bottom-up."""
    if not top.exists():
        return
    with contextlib.suppress(OSError):
        (top / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + BOOT_TIMEOUT
    while "populated 1" in _read(top / "cgroup.events") and time.monotonic() < deadline:
        time.sleep(0.01)
    for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir():
            with contextlib.suppress(OSError):
                directory.rmdir()
    top.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
