"""Where the recall benchmark's runs train: one after another in this process, or in a pool of worker processes
(one run each at a time; Ctrl-C stops every worker at once)."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queues
import signal
import threading
import time
import traceback

import torch

from memmix.evaluation.recall.models import BUILTIN_MODELS, RECALL_MODELS
from memmix.evaluation.recall.plan import Plan
from memmix.evaluation.recall.progress import RunProgress
from memmix.evaluation.recall.run import train_and_test
from memmix.evaluation.recall.settings import RecallSettingError, RecallSettings
from memmix.evaluation.recall.tasks import MQARTask


def worker_count(s: RecallSettings, num_runs: int) -> int:
    """Processes that train at once: s.workers, or (0) one per s.num_threads CPU cores (1 on CUDA, with
    torch's default thread count, or with a model registered at run time), never more than the runs."""
    late = [name for name in s.models if BUILTIN_MODELS.get(name) is not RECALL_MODELS.get(name)]
    if s.workers > 1 and late:
        raise RecallSettingError("workers", f"model {late[0]!r} is registered at run time, which worker processes "
                                            "do not see; allowed with it: 0 or 1")
    if s.workers:
        return max(1, min(s.workers, num_runs))
    if late or torch.device(s.device).type != "cpu" or s.num_threads == 0:
        return 1
    return max(1, min(num_runs, (os.cpu_count() or 1) // s.num_threads))


@contextlib.contextmanager
def torch_threads(count: int):
    """Within the block torch uses `count` intra-op threads (0: leave torch's setting)."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_here(plan: Plan, s: RecallSettings, tracker: RunProgress, finished, may_start) -> None:
    """The runs one after another in this process (Ctrl-C interrupts the run in progress at once)."""
    task = MQARTask(s)
    while True:
        spec = plan.next_ready(set(), may_start)
        if spec is None:
            return
        index = tracker.start(spec, plan)
        result = train_and_test(spec, s, task, lambda steps, loss: tracker.update(index, steps, loss))
        tracker.finish(index)
        finished(result)


def train_in_processes(plan: Plan, s: RecallSettings, workers: int, tracker: RunProgress, finished,
                        may_start) -> None:
    """Each run in one of ``workers`` processes ("spawn": fresh interpreters, no inherited thread pools). A worker
    takes the next run only when one is free, so stopping the pool stops everything: on any exception here
    (KeyboardInterrupt included) every worker is terminated at once."""
    context = multiprocessing.get_context("spawn")
    tasks, messages = context.Queue(), context.Queue()
    procs = [context.Process(target=_worker_main, args=(s, tasks, messages, os.getpid()), daemon=True)
             for _ in range(workers)]
    clean = False
    try:
        with _children_ignore_sigint():
            for proc in procs:
                proc.start()
        running: dict[str, int] = {}  # run key -> progress index
        while True:
            while len(running) < workers:
                spec = plan.next_ready(running, may_start)
                if spec is None:
                    break
                running[spec.key] = tracker.start(spec, plan)
                tasks.put(spec)
            if not running:
                break
            try:
                kind, key, payload = messages.get(timeout=0.5)
            except queues.Empty:
                dead = [p.exitcode for p in procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"a recall worker process exited unexpectedly (exit code {dead[0]}) while "
                                       f"training: {', '.join(running)}") from None
                continue
            if kind == "progress":
                tracker.update(running[key], *payload)
            elif kind == "done":
                tracker.finish(running.pop(key))
                finished(payload)
            else:
                raise RuntimeError(f"recall run '{key}' failed in a worker process:\n{payload}")
        clean = True
    finally:
        _stop_workers(procs, tasks, messages, clean)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started in the block ignore SIGINT from their first instruction (an ignored signal stays ignored
    across exec, and Python then installs no KeyboardInterrupt handler), so a Ctrl-C while a worker still imports
    torch leaves no traceback: the parent stops the workers. Only the main thread may change handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _stop_workers(procs, tasks, messages, clean: bool) -> None:
    """After a clean end, tell idle workers to exit; otherwise (or if they do not) terminate them; no process
    outlives this call."""
    if clean:
        for _ in procs:
            tasks.put(None)
        deadline = time.monotonic() + 10
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for q in (tasks, messages):
        q.cancel_join_thread()  # never block this process's exit on a queue nobody reads
        q.close()


def _worker_main(s: RecallSettings, tasks, messages, parent_pid: int) -> None:
    """A worker process: train runs from ``tasks`` until None; report progress, results and errors."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    _exit_with_parent(parent_pid)
    task = MQARTask(s)
    with torch_threads(s.num_threads):
        while True:
            spec = tasks.get()
            if spec is None:
                return
            try:
                result = train_and_test(spec, s, task,
                                        lambda steps, loss: messages.put(("progress", spec.key, (steps, loss))))
            except BaseException:
                messages.put(("error", spec.key, traceback.format_exc()))
                return
            messages.put(("done", spec.key, result))


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process when its parent is gone (killed with SIGKILL, say)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
