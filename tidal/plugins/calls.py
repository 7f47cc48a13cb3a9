"""Calls into user code, bounded and isolated: every call, sync or async, is bounded by a timeout
and isolated, so one that raises or hangs is recorded and never crashes the run. A plugin a fresh
process can load again (`plugin_ref`) can be called in a process of a pool (`BoundedCalls.in_process`),
where a call past its timeout is killed rather than left running."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import inspect
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from pebble import ProcessPool

from tidal.plugins.loading import PluginRef, describe_exception, load_plugin

T = TypeVar("T")


def call_plugin(ref: PluginRef, args: tuple[Any, ...]) -> tuple[bool, Any, Any]:
    """In a pool process: the plugin `ref` names, called on `args` (an awaitable it returns is run
    to its end). (True, its return value, `args[0]` after the call: a state it may have changed in
    place), or (False, the exception it raised, made to pickle, None)."""
    try:
        out = load_plugin(ref)(*args)
        if inspect.isawaitable(out):
            out = asyncio.run(_awaited(out))
    except BaseException as e:  # the isolation boundary, as in a thread
        return False, _portable(e), None
    return True, out, args[0] if args else None


def _portable(e: BaseException) -> Exception:
    """`e` as the caller can receive and raise it: itself if it pickles, else (or for SystemExit and
    the like, which must not escape a caller's event loop) a RuntimeError naming it."""
    if isinstance(e, Exception):
        try:
            pickle.loads(pickle.dumps(e))
            return e
        except Exception:
            pass
    return RuntimeError(describe_exception(e))


async def pool_call(calls: BoundedCalls, ref: PluginRef, copy_back: bool, *args: Any) -> Any:
    """The plugin `ref` names, called on `args` in a process of `calls`' pool and killed there past
    the timeout (counted from when a process takes it: `BoundedCalls.run` adds no bound of its own);
    with `copy_back`, what the call changed in `args[0]` (a state) is copied into the caller's."""
    ok, value, first = await calls.in_process(call_plugin, ref, args)
    if not ok:
        raise value
    if copy_back:
        copy_into(args[0], first)
    return value


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def copy_into(target: Any, source: Any) -> None:
    """Make `target` hold what `source` does, in place: a dict, list or set's items, or an object's
    attributes (a state changed in a pool process, made the caller's own again)."""
    if target is source:
        return
    if any(isinstance(target, kind) and isinstance(source, kind) for kind in (dict, set)):
        target.clear()
        target.update(source)
    elif isinstance(target, list) and isinstance(source, list):
        target[:] = source
    elif hasattr(target, "__dict__") and type(target) is type(source):
        vars(target).clear()
        vars(target).update(vars(source))


def _start_worker(cwd: str, path: list[str], refs: list[PluginRef]) -> None:
    """A new pool process: the parent's working directory and import path, its plugins loaded ahead,
    so a replacement for a killed process does not spend the next call's time on imports.

    Never raises: pebble marks the whole pool broken when a process fails to start."""
    if sys.platform == "linux":
        # Killed with the forkserver, its parent, so that a call spinning when the rollout worker is
        # killed outright does not outlive it. The forkserver exits when every holder of its "alive"
        # pipe has closed it: the process that started it and, unless they close it as here, every
        # process it forked, the spinning one included.
        server = multiprocessing.forkserver._forkserver
        if getattr(server, "_forkserver_alive_fd", None) is not None:
            os.close(server._forkserver_alive_fd)
            server._forkserver_alive_fd = None
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    try:
        os.chdir(cwd)
    except OSError:
        pass
    sys.path[:] = path
    for ref in refs:
        try:
            load_plugin(ref)
        except BaseException:  # the call itself loads it again and records why it failed
            pass


def start_forkserver(modules: Sequence[str]) -> None:
    """Start this process's forkserver, if not yet running, importing `modules` once there (in the
    background: this returns at once), so that the pool processes `BoundedCalls` forks from it later
    start in milliseconds, with those modules already imported.

    The preload list is the process's own (the first caller's wins). `__main__`, multiprocessing's
    default, stays on it: imported once there (as `__mp_main__`) instead of in every process forked.
    As with any multiprocessing but `fork`, a script that calls this must guard its top level with
    `if __name__ == "__main__":`.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *modules])
    multiprocessing.forkserver.ensure_running()


def _cpu_count() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's or a Ray worker's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------------- bounded calls


@dataclass
class CallResult:
    """Outcome of one bounded, isolated call (`BoundedCalls.run`)."""

    ok: bool
    value: Any = None
    """The call's return value (when ok)."""
    reason: str = ""
    """One line on why it failed: raised (with the exception), or timed out."""


def is_async(fn: Callable[..., Any]) -> bool:
    """A coroutine function, or an instance whose `__call__` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class ThreadCalls:
    """Sync calls in daemon threads, at most `max_threads` at once, each bounded by `timeout_s` from
    when it gets a slot (so a long queue is not mistaken for a slow call): env calls (an env's `reset`
    and `step` change state that lives in this process, so they must run here), and callables no
    fresh process can load (a closure, an env's bound `score`). A timed-out thread cannot be killed,
    so it is abandoned: it gives its slot back and, being a daemon, never holds up process exit.
    Awaited on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float, max_threads: int) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.max_threads = max_threads
        self._slots = asyncio.Semaphore(max_threads)

    async def one(self, fn: Callable[[], Any], name: str) -> tuple[bool, Any]:
        """(ok, return value or the exception raised) of `fn()` in a thread (an awaitable it returns is
        then awaited here); TimeoutError past the timeout."""
        t0 = time.monotonic()
        async with self._slots:
            ok, value = await asyncio.wait_for(self._run_in_thread([fn], name, threading.Event())[0], self.timeout_s)
        return await self._await_returned(ok, value, t0)

    async def each(self, fns: list[Callable[[], Any]], name: str) -> list[tuple[bool, Any] | None]:
        """`one` for many calls at once, in a few threads: (ok, value or exception) per call, None for
        one that timed out. The calls are dealt to up to `max_threads` lanes (a slot each); a lane's
        thread runs its calls one after another, each bounded by `timeout_s` from its start; past it
        the thread is abandoned and a new one takes the rest of the lane. A thread per call, as `one`
        starts, costs more than a quick reward does (a third of the quickstart's scoring)."""
        out: list[tuple[bool, Any] | None] = [None] * len(fns)
        n = min(self.max_threads, len(fns))
        await asyncio.gather(*(self._lane(fns, list(range(i, len(fns), n)), out, name) for i in range(n)))
        return out

    async def _lane(
        self, fns: list[Callable[[], Any]], lane: list[int], out: list[tuple[bool, Any] | None], name: str
    ) -> None:
        done = 0  # calls of the lane finished or timed out
        async with self._slots:
            while done < len(lane):
                stop = threading.Event()
                for fut in self._run_in_thread([fns[i] for i in lane[done:]], name, stop):
                    i, done, t0 = lane[done], done + 1, time.monotonic()
                    try:
                        ok, value = await asyncio.wait_for(fut, self.timeout_s)
                        out[i] = await self._await_returned(ok, value, t0)
                    except TimeoutError:
                        stop.set()  # the stuck thread runs nothing more; a new one takes the rest
                        break

    async def _await_returned(self, ok: bool, value: Any, t0: float) -> tuple[bool, Any]:
        """A sync call's outcome; an awaitable it returned is awaited within the time left since `t0`."""
        if ok and inspect.isawaitable(value):
            left, awaitable = max(self.timeout_s - (time.monotonic() - t0), 1e-3), value
            ok, value = await asyncio.wait_for(_run_async(lambda: awaitable), left)
        return ok, value

    def _run_in_thread(
        self, fns: list[Callable[[], Any]], name: str, stop: threading.Event
    ) -> list[asyncio.Future[tuple[bool, Any]]]:
        """Run `fns` one after another in a new daemon thread, until `stop` is set; a future per call."""
        loop = self.loop
        futures: list[asyncio.Future[tuple[bool, Any]]] = [loop.create_future() for _ in fns]

        def run() -> None:
            for fn, fut in zip(fns, futures, strict=True):
                if stop.is_set():
                    return
                try:
                    out: tuple[bool, Any] = (True, fn())
                except BaseException as e:  # The isolation boundary: even sys.exit() in user code is recorded.
                    out = (False, e)
                try:
                    loop.call_soon_threadsafe(_set_result, fut, out)
                except RuntimeError:  # The loop was closed; nobody waits for the rest.
                    return

        threading.Thread(target=run, name=f"call-{name}", daemon=True).start()
        return futures


class ProcessCalls:
    """Sync plugins a fresh process can load (given a `PluginRef`), in a pool of processes, at most
    `max_workers`; a call past `timeout_s` is killed with its process, which is replaced. This is
    where sync rewards run: a pathological input (math_verify on a huge expression, a regex that
    backtracks) stops burning a core at its timeout.

    The pool is made on the first call, from a forkserver (`start_forkserver`) rather than by forking
    this process: the caller is typically a Ray actor with threads of its own (Ray's, torch's, maybe
    CUDA), and a fork copies their locks in whatever state they are, which can deadlock the child. The
    forkserver is a clean, single-threaded process that imports tidal once, so a replacement process
    after a timeout starts in milliseconds; the price is that a process loads plugins again by ref,
    which a closure or an object made at run time has none of (those run in threads). A process runs
    in this process's working directory and import path as they were when the pool was made, with
    `preload`'s plugins loaded ahead.
    """

    def __init__(self, timeout_s: float, max_workers: int, preload: Sequence[PluginRef] = ()) -> None:
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.preload = list(preload)
        self._pool: ProcessPool | None = None
        self._pool_lock = asyncio.Lock()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a process of the pool, bounded by `timeout_s` from when a process takes it.

        `fn` is a module-level function (sent by name) that loads the plugin by its ref, calls it and
        returns a small record: the user's own return value or exception may not survive pickling.
        Raises TimeoutError past the timeout (the process is killed and replaced), and what the pool
        raises when it could not run the call: `pebble.ProcessExpired` for a process that died (a
        crash, `os._exit`), a pickling error for an argument that does not pickle.
        """
        pool = await self.pool(fn.__module__)
        return await asyncio.wrap_future(pool.schedule(fn, args, timeout=self.timeout_s))

    async def pool(self, preload_module: str) -> ProcessPool:
        """The pool, made (or made again, when broken) now."""
        if self._pool is not None and self._pool.active:
            return self._pool
        async with self._pool_lock:
            if self._pool is None or not self._pool.active:  # not made yet, or broken (a process dying idle)
                old, self._pool = self._pool, None
                # Off the loop: the first start waits for the forkserver's imports (seconds), during
                # which the loop's own timers would run late.
                self._pool = await asyncio.to_thread(self._start_pool, preload_module, old)
            return self._pool

    def _start_pool(self, preload_module: str, old: ProcessPool | None) -> ProcessPool:
        if old is not None:
            _stop_pools([old])
        start_forkserver([preload_module])  # a no-op if the caller started it ahead
        pool = ProcessPool(
            max_workers=self.max_workers,
            initializer=_start_worker,
            initargs=(os.getcwd(), list(sys.path), self.preload),
            context=multiprocessing.get_context("forkserver"),
        )
        _live_pools.add(pool)
        pool.schedule(os.getpid).result()  # starts the processes now, off the loop, not on the first call
        return pool

    def close(self) -> None:
        """Stop the pool's processes (killing calls still running there)."""
        if self._pool is not None:
            _stop_pools([self._pool])


class BoundedCalls:
    """Runs user calls on one long-lived event loop (in a daemon thread), each bounded by `timeout_s`
    and isolated, three ways by what the call is: async calls on the loop, cancelled at the timeout
    (clients they keep stay bound to one loop across batches); sync plugins a fresh process can load
    (`in_process`, given a `PluginRef`) in `ProcessCalls`, at most `max_threads` and the CPU count;
    other sync calls in `ThreadCalls`, at most `max_threads` at once."""

    def __init__(self, timeout_s: float, max_threads: int = 16, preload: Sequence[PluginRef] = ()) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        self.timeout_s = timeout_s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tidal-calls", daemon=True)
        self._thread.start()
        self.threads = ThreadCalls(self.loop, timeout_s, max_threads)
        self.processes = ProcessCalls(timeout_s, min(max_threads, _cpu_count()), preload)

    def submit(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop from any other thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def run(self, calls: list[Callable[[], Any]]) -> list[CallResult]:
        """Run zero-argument calls (sync, or returning an awaitable) concurrently, each bounded and isolated."""
        return self.submit(self._run_all(calls))

    async def _run_all(self, calls: list[Callable[[], Any]]) -> list[CallResult]:
        return list(await asyncio.gather(*(self._run_one(c) for c in calls)))

    async def _run_one(self, call: Callable[[], Any]) -> CallResult:
        try:
            if isinstance(call, partial) and call.func is pool_call:  # bounded in the pool
                ok, value = await self._pool_call(call)
            else:
                ok, value = await self.bounded(call, getattr(call, "__name__", "call"), is_async(call))
        except TimeoutError:
            return CallResult(False, reason=f"timed out after {self.timeout_s}s")
        return CallResult(True, value) if ok else CallResult(False, reason=f"raised {describe_exception(value)}")

    @staticmethod
    async def _pool_call(call: Callable[[], Any]) -> tuple[bool, Any]:
        """(ok, value or the exception raised) of a `pool_call`; TimeoutError when the pool killed it."""
        try:
            return True, await call()
        except TimeoutError:
            raise
        except Exception as e:
            return False, e

    async def bounded(self, fn: Callable[[], Any], name: str, async_fn: bool) -> tuple[bool, Any]:
        """(ok, return value or the exception raised) of `fn()` on the loop, bounded by `timeout_s`
        (TimeoutError past it): on the loop when `async_fn`, else in a thread (`ThreadCalls.one`)."""
        if async_fn:
            return await asyncio.wait_for(_run_async(fn), self.timeout_s)
        return await self.threads.one(fn, name)

    async def bounded_each(self, fns: list[Callable[[], Any]], name: str) -> list[tuple[bool, Any] | None]:
        """Many sync calls at once, in a few threads (`ThreadCalls.each`)."""
        return await self.threads.each(fns, name)

    async def in_process(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a process of the pool (`ProcessCalls.call`)."""
        return await self.processes.call(fn, *args)

    def start_pool(self, preload_module: str) -> None:
        """Start the process pool now, if not running: outside any call's timeout, which an async call
        into the pool (an isolated env's) would otherwise spend on the start."""
        self.submit(self.processes.pool(preload_module))

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def close(self) -> None:
        """Stop the pool's processes (killing calls still running there) and the loop; sync calls
        still running in threads are abandoned (daemon threads)."""
        if self.loop.is_closed():
            return
        self.processes.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():  # An async call blocking the loop would keep it running.
            self.loop.close()


def _stop_pools(pools: list[ProcessPool]) -> None:
    """Stop `pools` (killing calls still running) and wait for their manager threads and processes."""
    for pool in pools:
        pool.stop()
        pool.join(timeout=10.0)
        _live_pools.discard(pool)


_live_pools: set[ProcessPool] = set()
"""The pools started and not stopped yet, which the process stops as it exits (`atexit` below)."""

# A pool never closed is stopped at interpreter exit, before pebble's own exit hook runs: that hook lists
# the pool's processes without waiting for the pool's manager thread, so a process the manager starts
# meanwhile (replacing one killed at its timeout; slow under load) escapes it, and multiprocessing's exit
# then waits on that process forever. `ProcessPool.join` waits for the manager thread first. atexit runs
# the hooks registered last first, and pebble registered its own when this module imported it.
atexit.register(lambda: _stop_pools(list(_live_pools)))


async def _run_async(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, await fn()
    except Exception as e:  # CancelledError is a BaseException and passes, so wait_for can cancel.
        return False, e


def _set_result(fut: asyncio.Future[tuple[bool, Any]], out: tuple[bool, Any]) -> None:
    if not fut.done():  # Cancelled by wait_for when the call timed out.
        fut.set_result(out)
