"""The sandbox's runner: runs model code and its tests inside the sandbox (see `tidal.envs.sandbox`).

Run as `python -I -S -B -c <this file's text> <payload>` in the sandbox directory, never imported:
the child imports nothing of tidal and may be another interpreter (>= 3.8: no newer syntax here).
Everything it calls after model code starts is bound to a local first: model code can rebind
builtins, os.* and module globals (sys.modules["__main__"] is this script).
"""

import os
import sys


def _main():
    # One function on purpose: the order of its steps is the sandbox (limits before namespaces, the
    # reaper's fork before seccomp, ctypes gone before the audit hook), and it reads top to bottom.
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
        write(fd, f"\n{nonce} {kind} {index:d} {value:d} {msg}\n".encode("utf-8", "replace"))

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
    layers = {
        "rlimits": all(
            [
                lower("RLIMIT_AS", cfg["memory_mb"] * mb),
                lower("RLIMIT_CPU", cfg["cpu_s"]),
                lower("RLIMIT_FSIZE", cfg["max_file_mb"] * mb),
                lower("RLIMIT_CORE", 0),
                lower("RLIMIT_NOFILE", 256),
            ]
        )
    }
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
    roots = [os.path.realpath(p) for p in sys.path if p] + [
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/dev/random",
        "/usr/share/zoneinfo",
    ]
    # With seccomp, exec fails in the kernel; without, _posixsubprocess (an unaudited fork_exec) is refused.
    denied_imports = ("ctypes", "_ctypes") + (() if layers["seccomp"] else ("_posixsubprocess",))
    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd()), tuple(roots), tokens, stat.S_ISDIR, denied_imports))
    layers["audit"] = True
    emit("L", 0, 0, " ".join(f"{name}={on:d}" for name, on in sorted(layers.items())))
    _run(cfg["code"], cfg["tests"], emit, exit_)


def _unshare(uid, gid):
    """New user + network (+ PID) namespaces for this process; returns (libc, names of those made)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except Exception:  # no ctypes, or RLIMIT_AS too tight for libffi
        return None, ()
    for flags, names in ((0x70000000, ("userns", "netns", "pidns")), (0x50000000, ("userns", "netns"))):  # noqa: B007
        if libc.unshare(flags) == 0:
            break  # `names` says which
    else:
        return libc, ()
    try:  # keep our ids inside (no root in the namespace); failing leaves the overflow id, still isolated
        for path, text in (
            ("/proc/self/setgroups", "deny"),
            ("/proc/self/uid_map", f"{uid} {uid} 1"),
            ("/proc/self/gid_map", f"{gid} {gid} 1"),
        ):
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
    prog += [
        (jeq, 1, 0, socket_nr),
        (ret, 0, 0, allow),  # 4 + n: socket(): check the family
        (ld, 0, 0, 16),
        (jeq, 0, 1, 1),
        (ret, 0, 0, allow),  # args[0] == AF_UNIX
        (ret, 0, 0, deny),
    ]

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fprog = Prog(len(prog), insns)
    if _prctl(libc, 38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required for an unprivileged filter
        return False
    return (
        libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    )  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _make_hook(root, read_roots, tokens, is_dir, denied_imports):
    """The audit hook. It may use only what is bound here: it keeps working after model code rebinds
    builtins, os.path or this module's globals (which is why it is one long closure, not helpers).
    Paths are normalized lexically: no symlink can exist in the sandbox (creating one is denied), and
    paths that reach the sandbox through outside symlinks are denied, which errs on the safe side."""
    str_, bytes_, int_, len_, repr_ = str, bytes, int, len, repr
    isinstance_, PermissionError_, ImportError_, ValueError_ = isinstance, PermissionError, ImportError, ValueError
    BlockingIOError_, OSError_ = BlockingIOError, OSError
    to_str, decode = str.__str__, bytes.decode
    getcwd, readlink, stat_, read = os.getcwd, os.readlink, os.stat, os.read
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> ((path arg, dir_fd arg or -1), ...) for calls that modify the filesystem
    mutators = {
        "os.remove": ((0, 1),),
        "os.rmdir": ((0, 1),),
        "os.mkdir": ((0, 2),),
        "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),),
        "os.utime": ((0, 3),),
        "os.truncate": ((0, -1),),
        "os.rename": ((0, 2), (1, 3)),
        "os.setxattr": ((0, -1),),
        "os.removexattr": ((0, -1),),
        "os.chflags": ((0, -1),),
        "os.lchflags": ((0, -1),),
        "shutil.rmtree": ((0, 1),),
    }
    denied = frozenset(
        (
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.forkpty",
            "pty.spawn",
            "subprocess.Popen",
            "os.kill",
            "os.killpg",
            "signal.pthread_kill",
            "os.startfile",
            "os.link",
            "os.symlink",
            "resource.prlimit",
            "sys._current_frames",
            "sys._current_exceptions",
            "sys.settrace",
            "sys.setprofile",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "sys.monitoring.register_callback",
        )
    )
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    denied_imports = frozenset(denied_imports + ("_xxsubinterpreters", "_testcapi", "_testinternalcapi"))

    def fd_path(fd):
        try:
            return readlink(f"/proc/self/fd/{fd:d}")
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
        raise PermissionError_(f"sandbox: {event}{' ' + what if what else ''} is not allowed")

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
                raise ImportError_(f"sandbox: import of {name} is not allowed")
        elif event == "socket.__new__":
            # AF_UNIX socketpairs (asyncio's self-pipe); connect/bind/sendto stay denied for every family
            if not (len_(args) > 1 and isinstance_(args[1], int_) and args[1] == 1):
                deny(event, "")
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
    compile_, exec_, dict_, enumerate_, type_ = compile, exec, dict, enumerate, type
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
            exec_(compile_(source, f"<test {i}>", "exec"), dict_(namespace))
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


if __name__ == "__main__":
    _main()
