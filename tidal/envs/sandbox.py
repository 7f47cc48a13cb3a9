"""Run untrusted, model-written Python against unit tests: `run_tests(code, tests, limits)`.

The `code` env scores a completion by the fraction of hidden unit tests its code passes. The code is
hostile by assumption (an RL policy finds every shortcut), so it runs in a child interpreter behind
several independent layers; each covers gaps of the others, and a layer a machine lacks is reported
once in a log warning while the rest still apply.

1. **Process and files.** A fresh temporary directory is the child's cwd, HOME and TMPDIR, and is removed
   afterwards. The child is `python -I -S -B` (isolated: no user site, no PYTHON* variables, no site
   packages, no .pyc writes) with a minimal environment, so no inherited secret (WANDB_API_KEY, tokens)
   is visible. When we run as root the child drops to `nobody` (65534) before exec, the directory being
   chowned to it: the kernel then denies writes to anything root owns. Needs an interpreter `nobody`
   can execute (a pyenv under /root is not); otherwise the child keeps uid 0, with a warning.
2. **Resource limits** (set by the runner on itself before any model code): RLIMIT_AS (memory bombs get
   a MemoryError), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, and RLIMIT_NPROC: processes
   of the uid already running + `max_processes`, and, inside the user namespace of layer 3 (Linux >=
   5.14 counts per namespace), exactly `max_processes` more. The kernel does not enforce NPROC for uid 0.
   The child is a session leader; the parent SIGKILLs its process group at the timeout and at the end.
   Cannot bound: memory summed over processes (up to `max_processes + 1` times `memory_mb`), disk
   filled through many files (each is capped by RLIMIT_FSIZE) - a cgroup would; we use none.
3. **Namespaces** (`unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)` through ctypes in the runner,
   after the rlimits and the uid drop, so NPROC still counts against the unprivileged uid). The new
   network namespace has only a loopback that is down: no TCP/UDP/DNS anywhere, the host's 127.0.0.1
   included. The runner then forks the test process as PID 1 of a new PID namespace, with
   PR_SET_PDEATHSIG: when it dies, or when we kill the group, the kernel kills every process in the
   namespace, also those that left the process group with setsid(). We call unshare(2) ourselves rather
   than exec `unshare -rnpf` from util-linux: the syscall is the same (so the binary is no fallback
   when it fails), and this saves a second interpreter start. Needs unprivileged user namespaces;
   without them the parent falls back to killing the processes that carry this run's environment marker.
4. **Audit hook** (PEP 578), installed by the runner before any model code, raising on: sockets (every
   `socket.*` event), writes/creates/renames/removes outside the sandbox directory, reads outside it and
   the stdlib, links, exec/spawn/system/kill (a new program would run without the hook), more than
   `max_processes` forks in total, ctypes, code-object construction, and frame/gc/trace introspection
   (the way to the report nonce, see below). Audit hooks are not a security boundary on their own: a
   signal handler receives the current frame, marshal.loads (needed by imports) builds arbitrary code,
   and os.mkfifo/os.mknod are not audited. They are the second line behind the kernel layers.

**Result channel.** The runner reports over a dedicated pipe fd, each record prefixed by a 128-bit nonce
that the parent generates per call and passes in a file the runner deletes before any model code runs.
Printing a record (stdout is a different pipe) or exiting early counts nothing; writing into the result
fd needs the nonce, which lives only in closures reachable through the frames that the audit hook hides.
Every builtin the runner uses after model code starts is bound beforehand, so monkeypatching os.write or
builtins cannot observe or rewrite a record. In-process code can still cheat the tests themselves (an
object whose `__eq__` always returns True); that is for the reward design, not the sandbox.

The parent never blocks: it reads all three pipes with select up to the deadline, keeps at most
`max_output_kb` of each stream (draining and dropping the rest), kills the group and reaps.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pwd
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_NOBODY = 65534
_MARKER = "TIDAL_SANDBOX_ID"
"""Environment variable carrying a per-run id: finds the run's processes when there is no PID namespace."""
_RESULTS_CAP = 1 << 20
"""Bytes of result records kept; a record is ~100 bytes, so this only bounds a flood."""


@dataclass(frozen=True)
class SandboxLimits:
    """Bounds on one sandboxed run (frozen: the default instance is shared)."""

    timeout_s: float = 5.0
    """Wall clock; the whole process group is killed past it."""
    cpu_s: int = 5
    """RLIMIT_CPU per process, in seconds."""
    memory_mb: int = 512
    """RLIMIT_AS (address space) per process."""
    max_processes: int = 16
    """Processes the sandboxed code may create (fork bombs)."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE: the largest file the code may write."""
    max_output_kb: int = 64
    """Kept of each of stdout and stderr; the rest is read and dropped, never buffered without bound."""


@dataclass
class SandboxResult:
    """What one run did; `passed / total` is the usual reward."""

    passed: int
    """Tests that passed."""
    total: int
    """Tests run (or planned: those not reached count as failed)."""
    timed_out: bool
    exit_code: int | None
    """The test process's exit status (negative: killed by that signal); None when killed at the timeout."""
    error: str
    """One line: why it failed ("" when all passed)."""
    stdout: str
    stderr: str
    seconds: float
    layers: dict[str, bool] = field(default_factory=dict)
    """Isolation layers that were active (for logs and tests)."""


def run_tests(code: str, tests: list[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:  # noqa: B008
    """Run `code`, then each snippet of `tests` in the same process, and count the snippets that complete.

    A snippet passes when it runs without raising (typically `assert f(2) == 4`); one failing snippet does
    not stop the others. The call returns within `limits.timeout_s` plus a fraction of a second, whatever
    the code does; tests not reported by then count as failed.
    """
    plan = _plan()
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tidal-sandbox-")
    nonce, run_id = secrets.token_hex(16), secrets.token_hex(8)
    result_r, result_w = os.pipe()
    proc: subprocess.Popen[bytes] | None = None
    try:
        if plan.uid is not None:
            os.chown(workdir, plan.uid, plan.gid)
        payload = os.path.join(workdir, ".payload.json")
        with open(os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"nonce": nonce, "fd": result_w, "code": code, "tests": list(tests),
                       "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "max_file_mb": limits.max_file_mb,
                       "max_processes": limits.max_processes, "inner_nproc": plan.inner_nproc,
                       "nproc": _tasks_of(os.getuid() if plan.uid is None else plan.uid) + limits.max_processes + 2},
                      f)  # fmt: skip
        if plan.uid is not None:
            os.chown(payload, plan.uid, plan.gid)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               _MARKER: run_id}  # fmt: skip
        proc = subprocess.Popen(
            [plan.python, "-I", "-S", "-B", "-c", _RUNNER, payload], cwd=workdir, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(result_w,),
            start_new_session=True, user=plan.uid, group=plan.gid, extra_groups=[] if plan.uid is not None else None,
        )  # fmt: skip
        os.close(result_w)
        result_w = -1
        assert proc.stdout is not None and proc.stderr is not None
        out_fd, err_fd, cap = proc.stdout.fileno(), proc.stderr.fileno(), limits.max_output_kb * 1024
        pipes = _Pipes({out_fd: cap, err_fd: cap, result_r: _RESULTS_CAP})
        try:
            timed_out = _wait(proc, pipes, start + limits.timeout_s)
            _stop(proc, _records(bytes(pipes.bufs[result_r]), nonce))
            pipes.drain(0.2)  # what was written before the end; EOF comes once every writer is dead
        finally:
            pipes.close()
        records = bytes(pipes.bufs[result_r])
        layers = _parse_layers(records, nonce)
        sweep_uid = os.getuid() if plan.uid is None else plan.uid
        _reap(proc, sweep=None if layers.get("pidns") else (f"{_MARKER}={run_id}".encode(), sweep_uid))
    finally:
        if proc is not None and proc.returncode is None:  # we are here by an exception: still, leave nothing
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(result_r)
        if result_w >= 0:
            os.close(result_w)
        _remove(workdir)
    _warn_missing(layers, plan)
    return _result(records, nonce, len(tests), timed_out, proc.returncode, pipes.output(out_fd), pipes.output(err_fd),
                   time.monotonic() - start, limits, layers)  # fmt: skip


# ------------------------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class _Plan:
    python: str
    uid: int | None
    """The uid to drop to (we are root), else None."""
    gid: int | None
    inner_nproc: bool
    """The kernel counts RLIMIT_NPROC per user namespace (5.14+), so the runner can cap its own tree."""


@functools.cache
def _plan() -> _Plan:
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    inner = release is not None and (int(release[1]), int(release[2])) >= (5, 14)
    if os.geteuid() != 0:
        return _Plan(sys.executable, None, None, inner)
    try:
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid, gid = _NOBODY, _NOBODY
    # The interpreter of this process may sit where `nobody` cannot reach (a pyenv under /root): take the
    # first candidate it can run. Any Python >= 3.8 will do, the runner only needs the stdlib.
    candidates = [sys.executable, os.path.realpath(sys.executable), getattr(sys, "_base_executable", ""),
                  shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin") or ""]  # fmt: skip
    probe = "import sys; sys.exit(sys.version_info < (3, 8))"
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            done = subprocess.run([python, "-I", "-S", "-c", probe], user=uid, group=gid, extra_groups=[],
                                  cwd="/", capture_output=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return _Plan(python, uid, gid, inner)
    return _Plan(sys.executable, None, None, inner)


_warned: set[str] = set()


def _warn_missing(layers: dict[str, bool], plan: _Plan) -> None:
    """Log each missing isolation layer once per process (not per call)."""
    if not layers:
        return  # the runner did not start; the result's error says why
    missing = {
        "uid": "running as root and no Python interpreter is usable by `nobody`: the sandbox keeps uid 0, so "
        "RLIMIT_NPROC is not enforced (the fork cap of the audit hook and the timeout still apply)",
        "netns": "no network namespace (unprivileged user namespaces disabled?): only the audit hook blocks "
        "network access",
        "pidns": "no PID namespace: processes that leave the group are found by their environment marker",
        "rlimits": "some resource limits could not be set",
    }
    have = dict(layers, uid=plan.uid is not None or os.geteuid() != 0)
    for name, text in missing.items():
        if not have.get(name) and name not in _warned:
            _warned.add(name)
            log.warning("sandbox: %s", text)


def _remove(workdir: str) -> None:
    """Delete the sandbox directory, also when the code made parts of it unreadable (matters when not root)."""
    with contextlib.suppress(OSError):
        os.chmod(workdir, 0o700)
        for root, dirs, _ in os.walk(workdir):  # top-down: a directory is opened only after its chmod
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(workdir, ignore_errors=True)


def _tasks_of(uid: int) -> int:
    """Threads of `uid` now running (what RLIMIT_NPROC counts)."""
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass  # exited meanwhile
    return n


class _Pipes:
    """The child's stdout, stderr and result pipe, read without blocking; each keeps at most its cap (the rest
    is read and dropped, so a flood neither blocks the child nor grows our memory)."""

    def __init__(self, caps: dict[int, int]) -> None:
        self.caps = caps
        self.bufs = {fd: bytearray() for fd in caps}
        self.dropped: set[int] = set()
        self.sel = selectors.DefaultSelector()
        for fd in caps:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ)

    def read(self, timeout: float) -> None:
        """Read what arrives within `timeout` seconds (other registered fds, e.g. a pidfd, only wake us)."""
        for key, _ in self.sel.select(timeout):
            if key.fd not in self.caps:
                continue
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self.sel.unregister(key.fd)
                continue
            buf = self.bufs[key.fd]
            keep = data[: max(0, self.caps[key.fd] - len(buf))]
            buf += keep
            if len(keep) < len(data):
                self.dropped.add(key.fd)

    def drain(self, seconds: float) -> None:
        """Read until EOF on every pipe, or for at most `seconds` (a process outside our reach may hold one)."""
        end = time.monotonic() + seconds
        while any(fd in self.caps for fd in self.sel.get_map()) and time.monotonic() < end:
            self.read(max(0.0, end - time.monotonic()))

    def output(self, fd: int) -> bytes:
        return bytes(self.bufs[fd]) + (b"\n[output truncated]" if fd in self.dropped else b"")

    def close(self) -> None:
        self.sel.close()


def _wait(proc: subprocess.Popen[bytes], pipes: _Pipes, deadline: float) -> bool:
    """Read the pipes until the child exits or the deadline passes; True when it timed out. The child is only
    checked with WNOWAIT: unreaped, its pid (so its process group) cannot be reused before we kill it."""
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable once the child exits: no polling latency
        pipes.sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        while not _exited(proc.pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            pipes.read(left if pidfd >= 0 else min(left, 0.01))
        return False
    finally:
        if pidfd >= 0:
            pipes.sel.unregister(pidfd)
            os.close(pidfd)


def _exited(pid: int) -> bool:
    """Whether `pid` has exited, without reaping it (WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _stop(proc: subprocess.Popen[bytes], records: list[list[str]]) -> None:
    """Kill everything the child started. With a PID namespace, the test process (its PID 1) goes first and its
    parent, the runner's reaper, collects it: killing both at once would leave PID 1 a zombie for the host's
    init, which may reap late or never (a container without an init)."""
    test_pid = next((int(index) for kind, index, _, _ in records if kind == "P"), None)
    if test_pid is not None and not _exited(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(test_pid, signal.SIGKILL)  # its own group; the namespace dies with it
        end = time.monotonic() + 1.0
        while not _exited(proc.pid) and time.monotonic() < end:
            time.sleep(0.002)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen[bytes], sweep: tuple[bytes, int] | None) -> None:
    """Reap the child; without a PID namespace, also kill processes that left its group (found by this run's
    environment marker) and wait until none of the group runs (zombies left to init are dead already)."""
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    if sweep is None:
        return  # the reaper exits only after PID 1, and PID 1 only after the rest of its namespace
    _sweep(*sweep)
    end = time.monotonic() + 2.0
    while _group_alive(proc.pid):
        if time.monotonic() > end:
            log.warning("sandbox: processes of group %d still alive 2 s after SIGKILL", proc.pid)
            return
        time.sleep(0.005)


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (not a zombie)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    state, _, group = f.read().rpartition(b")")[2].split()[:3]
            except (OSError, ValueError):
                continue
            if state != b"Z" and int(group) == pgid:
                return True
    return False


def _sweep(marker: bytes, uid: int) -> None:
    for _ in range(10):  # a process may fork while we kill; NPROC bounds the rounds
        killed = False
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                os.kill(int(name), signal.SIGKILL)
                killed = True
            except OSError:
                continue
        if not killed:
            return


def _records(records: bytes, nonce: str) -> list[list[str]]:
    """The authentic records: lines `<nonce> <kind> <index> <value> <message>`; anything else is ignored."""
    out = []
    for line in records.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 4)
        if len(parts) >= 4 and parts[0] == nonce and parts[2].lstrip("-").isdigit() and parts[3].isdigit():
            out.append(parts[1:] + [""] * (5 - len(parts)))
    return out


def _parse_layers(records: bytes, nonce: str) -> dict[str, bool]:
    for kind, _, _, msg in _records(records, nonce):
        if kind == "L":
            return {k: v == "1" for k, _, v in (item.partition("=") for item in msg.split())}
    return {}


def _result(records: bytes, nonce: str, total: int, timed_out: bool, returncode: int | None, out: bytes,
            err: bytes, seconds: float, limits: SandboxLimits, layers: dict[str, bool]) -> SandboxResult:  # fmt: skip
    tests: dict[int, tuple[bool, str]] = {}
    solution: tuple[bool, str] | None = None
    done, exit_code = False, returncode
    for kind, index, value, msg in _records(records, nonce):
        if kind == "S" and solution is None:
            solution = (value == "1", msg)
        elif kind == "T" and 0 <= int(index) < total and int(index) not in tests:
            tests[int(index)] = (value == "1", msg)
        elif kind == "D":
            done = True
        elif kind == "X":  # the test process's own status, reported by its (trusted) parent in the sandbox
            exit_code = int(index)
    passed = sum(ok for ok, _ in tests.values())
    failed = sorted(i for i, (ok, _) in tests.items() if not ok)
    if timed_out:
        exit_code = None
        error = f"timed out after {limits.timeout_s:g} s ({len(tests)} of {total} tests reported)"
    elif not layers:
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {returncode}"]
        error = f"sandbox failed to start: {last[0]}"
    elif solution is not None and not solution[0]:
        error = f"solution failed: {solution[1]}"
    elif not done:
        how = f"killed by signal {-exit_code}" if exit_code is not None and exit_code < 0 else f"exited ({exit_code})"
        error = f"test process {how} after {len(tests)} of {total} tests (limit reached or os._exit?)"
    elif failed:
        error = f"{total - passed} of {total} tests failed; test {failed[0]}: {tests[failed[0]][1]}"
    else:
        error = ""
    return SandboxResult(passed, total, timed_out, exit_code, error[:500], out.decode("utf-8", "replace"),
                         err.decode("utf-8", "replace"), seconds, layers)  # fmt: skip


# ------------------------------------------------------------------------------------------- child side

# The runner, run as `python -I -S -B -c _RUNNER <payload>` in the sandbox directory. Kept as source
# text so that the child imports nothing of tidal (and may be a different interpreter, >= 3.8: no
# newer syntax here). Everything it calls after model code starts is bound to a local first: model
# code can rebind builtins, os.* and module globals (sys.modules["__main__"] is this script).
_RUNNER = r'''
import os
import sys


def _main():
    import json
    import resource
    import stat

    with open(sys.argv[1], "rb") as f:
        cfg = json.loads(f.read())
    os.unlink(sys.argv[1])
    sys.argv = [""]
    sys.orig_argv = [""]  # would show this script (and the payload path) to the model
    nonce, fd = cfg["nonce"], cfg["fd"]
    write, fstat, exit_ = os.write, os.fstat, os._exit
    pipe_id = fstat(fd)[1:3]  # (st_ino, st_dev) of the result pipe

    def emit(kind, index, value, msg):
        # A model that dup2()s its own pipe onto our fd would read the nonce from the next record.
        if fstat(fd)[1:3] != pipe_id:
            exit_(3)
        write(fd, ("\n%s %s %d %d %s\n" % (nonce, kind, index, value, msg)).encode("utf-8", "replace"))

    def lower(name, value):
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(kind, (value, value))
            return True
        except (OSError, ValueError):
            return False

    mb = 1 << 20
    layers = {"rlimits": all([lower("RLIMIT_AS", cfg["memory_mb"] * mb), lower("RLIMIT_CPU", cfg["cpu_s"]),
                              lower("RLIMIT_FSIZE", cfg["max_file_mb"] * mb), lower("RLIMIT_CORE", 0),
                              lower("RLIMIT_NOFILE", 256)])}
    layers["nproc"] = lower("RLIMIT_NPROC", cfg["nproc"]) and os.getuid() != 0
    uid, gid = os.getuid(), os.getgid()
    libc, names = _unshare(uid, gid)
    for name in ("userns", "netns", "pidns"):
        layers[name] = name in names
    if layers["pidns"]:
        pid = os.fork()
        if pid:  # the reaper: outside the namespace, runs no model code, so its reports are trusted
            emit("P", pid, 0, "")
            status = os.waitpid(pid, 0)[1]
            emit("X", os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status), 0, "")
            exit_(0)
        os.setpgid(0, 0)  # a group of its own, which the parent kills first
        _prctl(libc, 1, 9)  # PR_SET_PDEATHSIG = SIGKILL: die with the reaper, and the namespace with us
    if layers["userns"] and cfg["inner_nproc"]:
        # Counted per (namespace, uid): here only this tree (the outside parent, us, then the model's).
        lower("RLIMIT_NPROC", cfg["max_processes"] + (2 if layers["pidns"] else 1))
    import _signal

    _signal.signal = _no_signal_handlers
    layers["seccomp"] = libc is not None and _seccomp(libc)
    del libc
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # a new import now raises the audit "import" event, which the hook denies
    tokens, tokens_w = os.pipe()  # one byte per fork the model may make, shared by all its processes
    os.write(tokens_w, b"x" * cfg["max_processes"])
    os.close(tokens_w)
    os.set_blocking(tokens, False)
    roots = [os.path.realpath(p) for p in sys.path if p] + ["/dev/null", "/dev/zero", "/dev/urandom",
                                                            "/dev/random", "/usr/share/zoneinfo"]
    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd()), tuple(roots), tokens, stat.S_ISDIR))
    layers["audit"] = True
    emit("L", 0, 0, " ".join("%s=%d" % kv for kv in sorted(layers.items())))
    _run(cfg["code"], cfg["tests"], emit, exit_)


def _unshare(uid, gid):
    """New user + network (+ PID) namespaces for this process; returns (libc, names of those made)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:  # no ctypes, or RLIMIT_AS too tight for libffi
        return None, ()
    for flags, names in ((0x70000000, ("userns", "netns", "pidns")), (0x50000000, ("userns", "netns"))):
        if libc.unshare(flags) == 0:
            break
    else:
        return libc, ()
    try:  # keep our ids inside (no root in the namespace); failing leaves the overflow id, still isolated
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "%d %d 1" % (uid, uid)),
                           ("/proc/self/gid_map", "%d %d 1" % (gid, gid))):
            with open(path, "w") as f:
                f.write(text)
    except OSError:
        pass
    return libc, names


def _prctl(libc, *args):
    import ctypes

    return libc.prctl(*[ctypes.c_ulong(a) for a in args])  # unsigned long: the kernel reads all 64 bits


def _no_signal_handlers(signalnum, handler):
    """Replaces _signal.signal: a Python handler receives the current frame, so the runner's frames. No closure
    (it would hand out the original); ValueError is what asyncio.run expects where handlers are unavailable."""
    raise ValueError("sandbox: signal handlers are not allowed")


def _seccomp(libc):
    """A seccomp filter for what the audit hook can only ask Python not to do: it holds for copies of modules
    made without an audit event (importlib.util.module_from_spec) and for forked children. Denied (EPERM):
    execve/execveat (a new program runs without the hook), rt_sigaction (a new handler would get our frames),
    sockets other than AF_UNIX, and calls that only widen the kernel's attack surface. Returns whether it is
    in place (x86_64 and aarch64)."""
    import ctypes

    machine = os.uname().machine
    if machine == "x86_64":
        arch, socket_nr = 0xC000003E, 41
        # execve execveat rt_sigaction ptrace process_vm_readv/writev pidfd_getfd io_uring_setup unshare setns
        # mount bpf userfaultfd perf_event_open keyctl; then any x32 call (nr >= 1 << 30)
        nrs = (59, 322, 13, 101, 310, 311, 438, 425, 272, 308, 165, 321, 323, 298, 250)
        checks = [(0x35, 1 << 30)] + [(0x15, nr) for nr in nrs]  # JGE, JEQ
    elif machine == "aarch64":
        arch, socket_nr = 0xC00000B7, 198
        nrs = (221, 281, 134, 117, 270, 271, 438, 425, 97, 268, 40, 280, 282, 241, 219)
        checks = [(0x15, nr) for nr in nrs]
    else:
        return False
    ld, jeq, ret = 0x20, 0x15, 0x06
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # RET_ALLOW, RET_ERRNO | EPERM, RET_KILL_PROCESS
    n = len(checks)
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]  # other ABIs: kill
    prog += [(code, (9 + n) - (4 + i) - 1, 0, k) for i, (code, k) in enumerate(checks)]  # -> deny at 9 + n
    prog += [(jeq, 1, 0, socket_nr), (ret, 0, 0, allow),  # 4 + n: socket(): check the family
             (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, allow),  # args[0] == AF_UNIX
             (ret, 0, 0, deny)]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fprog = Prog(len(prog), insns)
    if _prctl(libc, 38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required for an unprivileged filter
        return False
    return libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _make_hook(root, read_roots, tokens, is_dir):
    """The audit hook. It may use only what is bound here: it keeps working after model code rebinds
    builtins, os.path or this module's globals. Paths are normalized lexically: no symlink can exist in
    the sandbox (creating one is denied), and paths that reach the sandbox through outside symlinks are
    denied, which errs on the safe side."""
    str_, bytes_, int_, len_, repr_ = str, bytes, int, len, repr
    isinstance_, PermissionError_, ImportError_, ValueError_ = isinstance, PermissionError, ImportError, ValueError
    BlockingIOError_, OSError_ = BlockingIOError, OSError
    to_str, decode = str.__str__, bytes.decode
    getcwd, readlink, stat_, read = os.getcwd, os.readlink, os.stat, os.read
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> ((path arg, dir_fd arg or -1), ...) for calls that modify the filesystem
    mutators = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
                "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, -1),),
                "os.rename": ((0, 2), (1, 3)), "os.setxattr": ((0, -1),), "os.removexattr": ((0, -1),),
                "os.chflags": ((0, -1),), "os.lchflags": ((0, -1),), "shutil.rmtree": ((0, 1),)}
    denied = frozenset(("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty", "pty.spawn",
                        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
                        "os.link", "os.symlink", "resource.prlimit", "sys._current_frames",
                        "sys._current_exceptions", "sys.settrace", "sys.setprofile", "gc.get_objects",
                        "gc.get_referrers", "gc.get_referents", "code.__new__", "sys.monitoring.register_callback"))
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    denied_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                                "_testinternalcapi"))

    def fd_path(fd):
        try:
            return readlink("/proc/self/fd/%d" % fd)
        except OSError_:
            return ""

    def resolve(path, dir_fd):
        """The absolute, normalized path `path` names, or "" when unknown."""
        if isinstance_(path, int_):
            path = fd_path(path)
            if not path.startswith("/"):
                return ""  # a pipe, socket or other anonymous file: nothing to check, nothing to allow
        elif isinstance_(path, bytes_):
            path = decode(path, "utf-8", "surrogateescape")
        elif isinstance_(path, str_):
            path = to_str(path)  # an exact str: a subclass could override the methods used below
        else:
            return ""
        if not path.startswith("/"):
            if path.startswith("../") or path == ".." or "/../" in path:
                return ""  # with a dir_fd we cannot see (open events lack it), ".." could climb anywhere
            try:
                base = fd_path(dir_fd) if dir_fd not in (None, -1) else getcwd()
            except OSError_:
                return ""
            if not base.startswith("/"):
                return ""
            path = base + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def under(path, roots):
        for r in roots:
            if path == r or path.startswith(r + "/"):
                return True
        return False

    inside = (root,)

    def deny(event, what):
        raise PermissionError_("sandbox: %s%s is not allowed" % (event, " " + what if what else ""))

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance_(path, int_):
                return  # an fd already open
            target = resolve(path, None)
            if under(target, inside):
                return
            writes = isinstance_(flags, int_) and flags & write_flags
            mode = to_str(mode) if isinstance_(mode, str_) else ""
            if "w" in mode or "a" in mode or "x" in mode or "+" in mode:
                writes = True
            if not writes and target and under(target, read_roots):
                try:
                    if not is_dir(stat_(target).st_mode):  # a directory fd would be a dir_fd base
                        return
                except OSError_:
                    return  # does not exist: open fails by itself
            deny(event, repr_(path))
        elif event in mutators:
            for path_i, fd_i in mutators[event]:
                target = resolve(args[path_i], args[fd_i] if fd_i >= 0 and len_(args) > fd_i else None)
                if not under(target, inside):
                    deny(event, repr_(args[path_i]))
        elif event == "os.listdir" or event == "os.scandir":
            path = args[0] if args[0] is not None else "."
            if not isinstance_(path, int_):
                target = resolve(path, None)
                if not (under(target, inside) or under(target, read_roots)):
                    deny(event, repr_(path))
        elif event == "os.fork":
            try:
                got = read(tokens, 1)
            except BlockingIOError_:
                got = b""
            if not got:
                raise BlockingIOError_(11, "sandbox: process limit reached")
        elif event == "import":
            name = to_str(args[0]) if isinstance_(args[0], str_) else ""
            if name.partition(".")[0] in denied_imports:
                raise ImportError_("sandbox: import of %s is not allowed" % name)
        elif event == "sys._getframe":
            # ValueError is what callers such as namedtuple, typing and logging already handle
            raise ValueError_("sandbox: frame introspection is not allowed")
        elif event == "object.__getattr__":
            name = to_str(args[1]) if len_(args) > 1 and isinstance_(args[1], str_) else ""
            if name in frame_attrs:
                deny(event, name)
        elif event in denied or event.startswith("socket.") or event.startswith("ctypes."):
            deny(event, "")

    return hook


def _run(code, tests, emit, exit_):
    """Run the solution, then each test; only locals bound before model code are used after it."""
    compile_, exec_, dict_, enumerate_, type_, isinstance_ = compile, exec, dict, enumerate, type, isinstance
    BaseException_, str_, to_str, replace = BaseException, str, str.__str__, str.replace
    type_name = type.__dict__["__name__"].__get__
    flush_out, flush_err = sys.stdout.flush, sys.stderr.flush

    def describe(e):
        try:
            text = to_str(str_(e))  # may run the model's __str__: harmless, it cannot reach our frames
            text = to_str(type_name(type_(e))) + (": " + text if text else "")
            return replace(replace(text, "\n", " "), "\r", " ")[:300]
        except BaseException_:
            return "exception"

    try:
        solution = compile_(code, "<solution>", "exec")
        namespace = {"__name__": "solution"}  # not "__main__": an `if __name__ == "__main__"` block would read stdin
        exec_(solution, namespace)
    except BaseException_ as e:
        emit("S", 0, 0, describe(e))
        tests = []
    else:
        emit("S", 0, 1, "")
    for i, source in enumerate_(tests):
        try:
            exec_(compile_(source, "<test %d>" % i, "exec"), dict_(namespace))
        except BaseException_ as e:
            emit("T", i, 0, describe(e))
        else:
            emit("T", i, 1, "")
    for flush in (flush_out, flush_err):
        try:
            flush()
        except BaseException_:
            pass
    emit("D", 0, 0, "")
    exit_(0)  # no atexit handlers or finalizers of the model's after the report


_main()
'''
