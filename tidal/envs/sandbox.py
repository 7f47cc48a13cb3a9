"""Run untrusted, model-written Python against unit tests: `run_tests(code, tests, limits)`.

The `code` env scores a completion by the fraction of hidden unit tests its code passes. The code is hostile
by assumption (an RL policy finds every shortcut), so it runs in a child interpreter behind independent
layers, each covering gaps of the others. A layer this machine lacks is logged once (not per call), and the
rest still apply; `SandboxResult.layers` says which were active.

1. **Process and files.** A fresh temporary directory is cwd, HOME and TMPDIR, removed afterwards. The child
   is `python -I -S -B` (no user site, no PYTHON* variables, no site-packages, no .pyc writes) with a minimal
   environment: no inherited secret (WANDB_API_KEY, tokens). As root, the child drops to `nobody` before exec
   (the directory is chowned to it), so the kernel denies writes to whatever root owns and makes
   RLIMIT_NPROC count. That needs an interpreter `nobody` can run (a pyenv under /root is not): the first of
   ours or the system's that works; with none, the child keeps uid 0, with a warning.
2. **Resource limits**, set by the runner on itself before any model code: RLIMIT_AS (a memory bomb gets a
   MemoryError), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, and RLIMIT_NPROC: the uid's running
   processes + `max_processes` (processes of other runs under the same uid share that margin), and, inside
   the user namespace of layer 3 (Linux 5.14+ counts per namespace), exactly `max_processes`. Not enforced
   for uid 0. Not bounded: memory summed over processes (up to `max_processes + 1` times `memory_mb`), disk
   filled through many files of RLIMIT_FSIZE each - a cgroup would; we use none.
3. **Namespaces.** `unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)` through ctypes in the runner, after
   the uid drop and the rlimits (as root in a namespace mapped to uid 0, NPROC would not count). We make the
   syscall ourselves rather than exec util-linux's `unshare -rnpf`: it is the same syscall (so no fallback when
   it fails) and saves a second interpreter start. The new network namespace has only a loopback that is
   down: no TCP/UDP/DNS, the host's 127.0.0.1 included. The runner forks the test process as PID 1 of the new
   PID namespace, in a process group of its own, with PR_SET_PDEATHSIG; its parent stays outside, runs no
   model code and reaps it. When PID 1 dies the kernel kills the whole namespace, also processes that left
   the group with setsid(). The parent kills that group first and lets the reaper collect PID 1, so no zombie
   is left to a host init that may not reap. Without user namespaces (disabled by sysctl or AppArmor), the
   parent kills the process group and then every process carrying this run's environment marker.
4. **Seccomp filter** (x86_64, aarch64), installed by the test process just before the hook: execve/execveat
   (a new program would run without the hook), rt_sigaction (a Python signal handler receives the current
   frame, so the runner's), socket() other than AF_UNIX (a kernel network block even without layer 3), and
   ptrace, process_vm_*, pidfd_getfd, io_uring, unshare, setns, mount, bpf, userfaultfd, perf_event_open,
   keyctl fail with EPERM; other ABIs (x32, i386) are killed.
5. **Audit hook** (PEP 578), installed before the model code runs, using only names bound beforehand, since
   the model may rebind builtins and modules. It denies every socket operation except creating AF_UNIX ones
   (asyncio's self-pipe); writes, renames, removes, links outside the sandbox directory; reads outside it
   and the stdlib; opening directories outside it (as dir_fd bases); exec, spawn, system, kill; more than
   `max_processes` os.fork() in total; ctypes; and the routes to the runner's frames (sys._getframe, tb_frame,
   gi/cr/ag_frame, gc.get_objects/referrers, settrace/setprofile; `_signal.signal` is stubbed to raise).
   Audit hooks are no boundary on their own: `importlib.util.module_from_spec` makes fresh copies of builtin
   modules without an audit event (layer 4 then refuses what the copies of `_signal` and `_posixsubprocess`
   would do); `marshal.loads`, which imports need, builds arbitrary bytecode, hence arbitrary memory access;
   os.mkfifo/os.mknod are not audited. It is the fine-grained layer behind the kernel's.

**Result channel.** The runner reports over a pipe fd of its own, each record prefixed by a 128-bit nonce
drawn per call, passed in a file the runner deletes before any model code runs. Printing a record (stdout is
another pipe), exiting early or rewriting `os.write` counts nothing: the nonce is needed, and it lives only in
a closure reachable from the runner's frames, which layers 4-5 hide. A model that dup2()s its own pipe over
the result fd to read the next record is caught by an inode check before every record. So forging takes an
exploit of the interpreter (above), not a print. Tests that the code itself fools (an object whose `__eq__`
always returns True) are a matter for the tests, not the sandbox.

The parent never blocks: it reads the three pipes with select up to the deadline, keeps at most
`max_output_kb` of each stream (reading and dropping the rest), kills, and reaps.
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
from pathlib import Path
from typing import Any

# One file, longer than our ~450 lines, importing nothing of tidal: it also runs loaded from its path by a
# system python as another user (tests/integration/test_sandbox.py), with sandbox_runner.py beside it.
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
        payload = _write_payload(workdir, plan, limits, {"nonce": nonce, "fd": result_w, "code": code, "tests": tests})
        proc = _spawn(plan, payload, workdir, run_id, result_w)
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
    return _result(
        records,
        nonce,
        len(tests),
        timed_out,
        proc.returncode,
        pipes.output(out_fd),
        pipes.output(err_fd),
        time.monotonic() - start,
        limits,
        layers,
    )


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
    candidates = [
        sys.executable,
        os.path.realpath(sys.executable),
        getattr(sys, "_base_executable", ""),
        shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin") or "",
    ]
    probe = "import sys; sys.exit(sys.version_info < (3, 8))"
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            done = subprocess.run(
                [python, "-I", "-S", "-c", probe],
                user=uid,
                group=gid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return _Plan(python, uid, gid, inner)
    return _Plan(sys.executable, None, None, inner)


_warned: set[str] = set()


def _write_payload(workdir: str, plan: _Plan, limits: SandboxLimits, run: dict[str, Any]) -> str:
    """The runner's instructions (`run`: nonce, result fd, code, tests; and the limits), written
    where only the sandbox's user reads them; their path."""
    if plan.uid is not None:
        os.chown(workdir, plan.uid, plan.gid)
    payload = os.path.join(workdir, ".payload.json")
    tasks = _tasks_of(os.getuid() if plan.uid is None else plan.uid)
    with open(os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(
            {
                **run,
                "tests": list(run["tests"]),
                "cpu_s": limits.cpu_s,
                "memory_mb": limits.memory_mb,
                "max_file_mb": limits.max_file_mb,
                "max_processes": limits.max_processes,
                "inner_nproc": plan.inner_nproc,
                "nproc": tasks + limits.max_processes + 2,
            },
            f,
        )
    if plan.uid is not None:
        os.chown(payload, plan.uid, plan.gid)
    return payload


def _spawn(plan: _Plan, payload: str, workdir: str, run_id: str, result_w: int) -> subprocess.Popen[bytes]:
    """The runner, as the sandbox's user in a session of its own, with a bare environment marked
    with `run_id` (what a sweep finds its processes by) and the result pipe's write end."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        _MARKER: run_id,
    }
    return subprocess.Popen(
        [plan.python, "-I", "-S", "-B", "-c", _RUNNER, payload],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(result_w,),
        start_new_session=True,
        user=plan.uid,
        group=plan.gid,
        extra_groups=[] if plan.uid is not None else None,
    )


def _warn_missing(layers: dict[str, bool], plan: _Plan) -> None:
    """Log each missing isolation layer once per process (not per call)."""
    if not layers:
        return  # the runner did not start; the result's error says why
    missing = {
        "uid": "running as root and no Python interpreter is usable by `nobody`: the sandbox keeps uid 0, so "
        "RLIMIT_NPROC is not enforced (the fork cap of the audit hook and the timeout still apply)",
        "netns": "no network namespace (unprivileged user namespaces disabled?): the seccomp filter and the "
        "audit hook still block network access",
        "pidns": "no PID namespace: processes that leave the group are found by their environment marker",
        "seccomp": "no seccomp filter (not x86_64/aarch64, or no ctypes): exec and signal handlers are refused "
        "by the audit hook only, which copies of modules made with importlib.util.module_from_spec get around",
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
    """Kill the processes of `uid` whose environment holds `marker` (those that left the group)."""
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


def _result(
    records: bytes,
    nonce: str,
    total: int,
    timed_out: bool,
    returncode: int | None,
    out: bytes,
    err: bytes,
    seconds: float,
    limits: SandboxLimits,
    layers: dict[str, bool],
) -> SandboxResult:
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
    return SandboxResult(
        passed,
        total,
        timed_out,
        exit_code,
        error[:500],
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        seconds,
        layers,
    )


# ------------------------------------------------------------------------------------------- child side

# The runner, run as `python -I -S -B -c <source> <payload>` in the sandbox directory. It lives in
# its own file, read as text: the sandbox's interpreter may be a different Python (see `_plan`), so
# the runner imports nothing of tidal and stays compatible with Python 3.8.
_RUNNER = (Path(__file__).parent / "sandbox_runner.py").read_text()
