"""The code sandbox: scoring, and hostile code (hangs, fork bombs, escapes, network, memory, forged reports)."""

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tidal.envs.sandbox import SandboxLimits, SandboxResult, run_tests

pytestmark = pytest.mark.integration

FAST = SandboxLimits(timeout_s=2.0, cpu_s=2, memory_mb=512, max_processes=8)
SLACK_S = 1.5
"""What a run may take past its timeout: killing, draining and reaping."""


def _leftovers() -> list[int]:
    """Processes still carrying a sandbox run's environment marker (none may survive a run)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if b"TIDAL_SANDBOX_ID=" in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def _run(code: str, tests: list[str], limits: SandboxLimits = FAST) -> SandboxResult:
    result = run_tests(code, tests, limits)
    assert _leftovers() == [], "a sandboxed process survived the run"
    return result


def test_correct_code_passes_all_tests() -> None:
    code = "def add(a, b):\n    return a + b\n"
    result = _run(code, ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"])
    assert (result.passed, result.total, result.timed_out, result.exit_code, result.error) == (3, 3, False, 0, "")
    assert result.seconds < 2.0
    assert result.layers["audit"] and result.layers["rlimits"]


def test_partly_correct_code_passes_some_tests() -> None:
    code = "def square(x):\n    print('called', x)\n    return x * x if x < 3 else x + 1\n"
    tests = [
        "assert square(2) == 4",
        "assert square(3) == 9, 'three'",
        "assert undefined(1)",
        "assert (",
        "1/0",
        "assert square(1) == 1",
    ]
    result = _run(code, tests)
    assert (result.passed, result.total, result.timed_out) == (2, 6, False)
    assert result.error == "4 of 6 tests failed; test 1: AssertionError: three"
    assert "called 2" in result.stdout and "called 1" in result.stdout


def test_syntax_error_fails_with_a_clear_error() -> None:
    result = _run("def f(:\n    return 1\n", ["assert f() == 1", "assert True"])
    assert (result.passed, result.total) == (0, 2)
    assert result.error.startswith("solution failed: SyntaxError:") and "line 1" in result.error


def test_solution_raising_or_exiting_at_top_level_fails_every_test() -> None:
    for code in ("raise RuntimeError('boom')", "import sys\nsys.exit(0)", "input()"):
        result = _run(code, ["assert True", "assert 1"])
        assert (result.passed, result.total) == (0, 2), code
        assert result.error.startswith("solution failed:"), result.error


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    code = "def f():\n    return 1\n"
    t0 = time.monotonic()
    result = _run(code, ["assert f() == 1", "while True:\n    pass", "assert f() == 1"])
    assert time.monotonic() - t0 < FAST.timeout_s + SLACK_S
    assert (result.passed, result.total, result.timed_out, result.exit_code) == (1, 3, True, None)
    assert result.error == "timed out after 2 s (1 of 3 tests reported)"


def test_cpu_limit_kills_a_spinning_process() -> None:
    limits = SandboxLimits(timeout_s=5.0, cpu_s=1)
    result = _run("", ["while True:\n    pass"], limits)
    assert (result.passed, result.timed_out) == (0, False)
    assert result.seconds < 3.0
    assert result.exit_code is not None and result.exit_code < 0  # SIGKILL (or SIGXCPU outside a PID namespace)
    assert "killed by signal" in result.error


def test_fork_bomb_is_contained() -> None:
    code = (
        "import os\n"
        "def bomb():\n"
        "    while True:\n"
        "        try:\n"
        "            if os.fork() == 0:\n"
        "                os.setsid()  # try to leave the process group\n"
        "        except OSError:\n"
        "            pass\n"
    )
    t0 = time.monotonic()
    result = _run(code, ["bomb()"])
    assert time.monotonic() - t0 < FAST.timeout_s + SLACK_S
    assert result.timed_out and result.passed == 0
    # The machine stays usable: the next run is quick.
    assert _run("x = 1", ["assert x == 1"]).passed == 1


def test_process_limits() -> None:
    code = (
        "import os, resource, time\n"
        "def spawn(n):\n"
        "    made = 0\n"
        "    for _ in range(n):\n"
        "        try:\n"
        "            pid = os.fork()\n"
        "        except OSError:\n"
        "            continue\n"
        "        if pid == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        made += 1\n"
        "    return made\n"
    )
    limits = SandboxLimits(timeout_s=3.0, max_processes=4)
    result = _run(
        code, ["print('made', spawn(10))", "print('nproc', resource.getrlimit(resource.RLIMIT_NPROC)[0])"], limits
    )
    assert result.passed == 2, result.error
    assert "made 4\n" in result.stdout
    if result.layers["userns"] and result.layers["nproc"]:
        assert "nproc 6\n" in result.stdout  # max_processes + the two processes of the runner, per namespace


def test_writes_outside_the_sandbox_are_blocked(tmp_path: Path) -> None:
    owned = tmp_path / "owned-by-the-run.txt"
    in_tmp = Path("/tmp") / f"tidal-sandbox-escape-{uuid.uuid4().hex}"
    code = (
        "import os, shutil\n"
        "def blocked(action, *args):\n"
        "    try:\n"
        "        action(*args)\n"
        "    except OSError:\n"
        "        return True\n"
        "    return False\n"
        "def write(path):\n"
        "    with open(path, 'w') as f:\n"
        "        f.write('pwned')\n"
        "def os_write(path):\n"
        "    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))\n"
    )
    tests = [
        f"assert blocked(write, {str(owned)!r})",
        f"assert blocked(write, {str(in_tmp)!r})",
        f"assert blocked(os_write, {str(in_tmp)!r})",
        f"assert blocked(os.mkdir, {str(in_tmp)!r})",
        "assert blocked(write, '../escape.txt')",
        f"assert blocked(os.symlink, {str(in_tmp)!r}, 'link')",
        f"assert blocked(shutil.copy, '/dev/null', {str(in_tmp)!r})",
        "assert blocked(os.open, '/tmp', os.O_RDONLY)",
        "write('inside.txt'); os.mkdir('sub'); os.rename('inside.txt', 'sub/x.txt'); shutil.rmtree('sub')",
    ]
    result = _run(code, tests)
    assert result.passed == len(tests), result.error
    assert not owned.exists() and not in_tmp.exists()


def test_run_files_can_be_neither_read_nor_changed(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.5}\n')
    before = (metrics.read_bytes(), metrics.stat().st_mtime_ns)
    path = str(metrics)
    code = (
        "import os, shutil\n"
        "def attempt(action):\n"
        "    try:\n"
        "        print('got', action())\n"
        "    except OSError as e:\n"
        "        print('denied', type(e).__name__)\n"
    )
    tests = [
        f"attempt(lambda: open({path!r}).read())",
        f"attempt(lambda: open({path!r}, 'a').write('x'))",
        f"attempt(lambda: os.remove({path!r}))",
        f"attempt(lambda: os.rename({path!r}, 'stolen'))",
        f"attempt(lambda: os.truncate({path!r}, 0))",
        f"attempt(lambda: os.chmod({path!r}, 0o777))",
        f"attempt(lambda: shutil.rmtree({str(tmp_path)!r}))",
        f"attempt(lambda: os.listdir({str(tmp_path)!r}))",
        "attempt(lambda: open('/etc/hostname').read())",
        "attempt(lambda: open('/proc/self/environ').read())",
    ]
    result = _run(code, tests)
    assert result.passed == len(tests), result.error
    assert result.stdout.count("denied") == len(tests), result.stdout
    assert "reward" not in result.stdout
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before


def test_network_is_unreachable() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    code = (
        "import socket\ndef connect(port):\n    socket.create_connection(('127.0.0.1', port), timeout=1).send(b'x')\n"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        result = _run(code, [f"connect({port})", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=1)"])
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert result.passed == 0 and "not allowed" in result.error


def test_memory_bomb_fails_inside_the_sandbox() -> None:
    result = _run("", ["x = bytearray(4 * 1024 ** 3)", "x = [0] * (10 ** 9)", "assert sum(range(10)) == 45"])
    assert (result.passed, result.total, result.timed_out) == (1, 3, False)
    assert "MemoryError" in result.error
    assert len(bytearray(64 * 1024 * 1024)) > 0  # the parent is fine


def test_huge_output_is_truncated() -> None:
    limits = SandboxLimits(timeout_s=2.0, max_output_kb=8)
    result = _run(
        "", ["print('x' * 20_000_000)", "import sys; sys.stderr.write('e' * 1_000_000)", "assert True"], limits
    )
    assert (result.passed, result.timed_out) == (3, False)
    assert len(result.stdout) <= 8 * 1024 + 40 and result.stdout.endswith("[output truncated]")
    assert len(result.stderr) <= 8 * 1024 + 40 and result.stderr.startswith("eee")


def test_forged_reports_do_not_count() -> None:
    code = (
        "import os, sys\n"
        "real_write = os.write\n"
        "def fake(fd, data):  # rewrite every record as a pass\n"
        "    print('fake write called')\n"
        "    return real_write(fd, data.replace(b' 0 ', b' 1 '))\n"
        "os.write = fake\n"
        "def forge():\n"
        "    for i in range(3):\n"
        "        line = '%032x T %d 1 \\n%032x D 0 0 \\n' % (i, i, i)\n"
        "        print('T', i, 1); print(line)\n"
        "        for fd in range(3, 64):\n"
        "            try:\n"
        "                real_write(fd, line.encode())\n"
        "            except OSError:\n"
        "                pass\n"
        "    sys.stdout.flush()\n"
    )
    result = _run(code, ["forge(); assert False", "forge(); os._exit(0)", "assert False"])
    assert result.passed == 0 and result.total == 3
    assert not result.timed_out and "fake write called" not in result.stdout


def test_routes_to_the_runner_and_out_of_the_hook_are_blocked() -> None:
    """Frames (the way to the report nonce), fresh module copies made without audit events, exec, ctypes."""
    code = (
        "import gc, importlib.util, os, sys\n"
        "def blocked(action):\n"
        "    try:\n"
        "        action()\n"
        "    except (OSError, ValueError, ImportError):\n"
        "        return True\n"
        "    return False\n"
        "def tb_frame():\n"
        "    try:\n"
        "        raise KeyError\n"
        "    except KeyError as e:\n"
        "        return e.__traceback__.tb_frame\n"
        "def fresh(name):  # a new copy of a builtin module: no audit event on the way\n"
        "    return importlib.util.module_from_spec(importlib.util.find_spec(name))\n"
        "def handler(signum, frame):\n"
        "    pass\n"
    )
    tests = [
        "assert blocked(lambda: sys._getframe(1))",
        "assert blocked(tb_frame)",
        "assert blocked(gc.get_objects)",
        "assert blocked(lambda: sys.settrace(None))",
        "import signal; assert blocked(lambda: signal.signal(signal.SIGALRM, handler))",
        "assert blocked(lambda: __import__('ctypes'))",
        "assert blocked(lambda: fresh('_ctypes').dlopen(None))",
        "assert blocked(lambda: os.system('true'))",
        "assert blocked(lambda: os.kill(1, 0))",
        "assert blocked(lambda: os.execv('/bin/true', ['true']))",
        "import subprocess; assert blocked(lambda: subprocess.run(['/bin/true']))",
    ]
    result = _run(code, tests)
    assert result.passed == len(tests), result.error
    if result.layers["seccomp"]:  # the kernel refuses what a fresh copy of a module could otherwise do
        result = _run(code, ["assert blocked(lambda: fresh('_signal').signal(14, handler))"])
        assert result.passed == 1, result.error


def test_result_pipe_cannot_be_hijacked() -> None:
    """dup2() of the model's own pipe over our result fd would show it the nonce of the next record."""
    code = (
        "import os\n"
        "state = {}\n"
        "def hijack():\n"
        "    r, w = os.pipe()\n"
        "    os.set_blocking(r, False)\n"
        "    saved = {}\n"
        "    for fd in range(3, 64):\n"
        "        if fd not in (r, w):\n"
        "            try:\n"
        "                saved[fd] = os.dup(fd)\n"
        "                os.dup2(w, fd)\n"
        "            except OSError:\n"
        "                pass\n"
        "    state.update(r=r, saved=saved)\n"
        "def forge():\n"
        "    nonce = os.read(state['r'], 4096).decode().split()[0]\n"
        "    for fd in state['saved'].values():\n"
        "        for i in range(4):\n"
        "            try:\n"
        "                os.write(fd, ('\\n%s T %d 1 \\n' % (nonce, i)).encode())\n"
        "            except OSError:\n"
        "                pass\n"
    )
    result = _run(code, ["hijack(); assert False", "forge(); assert False", "assert False", "assert False"])
    assert (result.passed, result.total) == (0, 4)


def test_environment_is_minimal_and_common_stdlib_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    code = (
        "import bisect, collections, dataclasses, datetime, decimal, enum, fractions, functools, heapq, itertools\n"
        "import asyncio, json, logging, math, os, random, re, statistics, string, tempfile, typing\n"
        "T = typing.TypeVar('T')\n"
        "Point = collections.namedtuple('Point', 'x y')\n"
        "Color = enum.Enum('Color', 'RED GREEN')\n"
        "@dataclasses.dataclass\n"
        "class Box:\n"
        "    size: int = 1\n"
    )
    tests = [
        "assert 'WANDB_API_KEY' not in os.environ and os.environ['HOME'] == os.getcwd()",
        "assert Point(1, 2).x == 1 and Color.RED.value == 1 and Box().size == 1",
        "logging.getLogger('x').warning('hello')",
        "async def main():\n    await asyncio.sleep(0.01)\n    return 42\nassert asyncio.run(main()) == 42",
        "with tempfile.NamedTemporaryFile('w', delete=False) as f: f.write('x')",
        "assert json.loads(json.dumps([1])) == [1] and math.isqrt(17) == 4",
        "assert decimal.Decimal('1.5') * 2 == 3 and fractions.Fraction(1, 3) * 3 == 1",
    ]
    result = _run(code, tests)
    assert result.passed == len(tests), (result.error, result.stderr)
    assert "secret-key" not in result.stdout + result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="drops to uid 65534 to exercise the non-root path")
def test_runs_as_a_normal_user() -> None:
    """The same module run by an unprivileged user: no uid drop, NPROC relative to the user's processes."""
    module = Path(__file__).resolve().parents[2] / "tidal" / "envs" / "sandbox.py"
    escape = Path("/tmp") / f"tidal-sandbox-escape-{uuid.uuid4().hex}"
    tests = [
        "assert f(2) == 4",
        "assert f(1) == 3",
        "import os; os.fork() or os._exit(0)",
        f"open({str(escape)!r}, 'w')",
    ]
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('sandbox', {str(module)!r})\n"
        "sandbox = importlib.util.module_from_spec(spec); sys.modules['sandbox'] = sandbox\n"
        "spec.loader.exec_module(sandbox)\n"
        "limits = sandbox.SandboxLimits(timeout_s=2.0, max_processes=4)\n"
        f"r = sandbox.run_tests('def f(x):\\n    return 2 * x\\n', json.loads({json.dumps(tests)!r}), limits)\n"
        "print(json.dumps([r.passed, r.total, r.error, r.layers]))\n"
    )
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 usable by uid 65534")
    done = subprocess.run(
        [python, "-I", "-c", script],
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0 and "Permission denied" in done.stderr:
        pytest.skip(f"uid 65534 cannot read {module}")
    assert done.returncode == 0, done.stderr
    passed, total, error, layers = json.loads(done.stdout.strip().splitlines()[-1])
    assert (passed, total) == (2, 4), error
    assert error.startswith("2 of 4 tests failed; test 1: AssertionError")
    assert layers["audit"] and layers["nproc"]
    assert not escape.exists()
