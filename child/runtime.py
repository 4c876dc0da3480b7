"""The child process: load the processor once, then run jobs one at a time on the main thread.

Threads:
- the main thread runs each processor call, so SIGTERM (whose Python handler always runs on the main
  thread) can raise ``JobTerminated`` inside the processor;
- a reader thread receives frames. It aborts a job's signal the moment a cancel arrives, even while
  the main thread is busy in user code. When the supervisor's end of the socket closes (because the
  supervisor died or retired this child), it ends the whole process group.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import importlib
import importlib.util
import inspect
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .abort import AbortController, AbortError
from .errors import JobTerminated
from .job import SandboxedJob

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
MAX_TRACEBACK_CHARS = 64 * 1024

# Exit status used when the child ends itself because the supervisor is gone.
EXIT_PARENT_GONE = 70
CHILD_SWITCH_INTERVAL_S = 0.001

# Exit status used when the child could not send a job's outcome over its protocol connection.
EXIT_PROTOCOL_BROKEN = 71

# Every process the child starts inherits this variable with the child's pid, so the supervisor can
# recognise a descendant that left the child's process group and lost its parent (a double-forked
# daemon). A process that clears its environment is not recognised this way.
TREE_TAG_VARIABLE = "SANDBOX_RUNTIME_CHILD_PID"

# The signal this child gets when the supervisor's spawning thread ends. After the ladder's SIGTERM
# the supervisor kills the job's other processes a grace period later. After the supervisor's death
# no process is left to do that, so this child must. A SIGTERM handler cannot tell the two apart, and
# neither can getppid(): a SIGKILLed supervisor may first re-parent the child to another of its
# dying threads.
PARENT_DEATH_SIGNAL = signal.SIGRTMIN


class ProcessorLoadError(Exception):
    def __init__(self, exc: BaseException, retryable: bool) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.retryable = retryable


@dataclass
class JobContext:
    start: protocol.Start
    controller: AbortController

    @property
    def job_id(self) -> str:
        return str(self.start.job.get("id"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m child")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the protocol socket")
    parser.add_argument("--parent", type=int, required=True, help="pid of the supervisor")
    args = parser.parse_args(argv)

    # A parent-death signal ends this child if the supervisor's spawning thread dies. The
    # supervisor spawns from a thread that lives as long as its process does.
    _prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    if os.getppid() != args.parent:
        os._exit(EXIT_PARENT_GONE)
    os.environ[TREE_TAG_VARIABLE] = str(os.getpid())

    sock = socket.socket(fileno=args.fd)
    sock.set_inheritable(False)
    connection = protocol.BlockingConnection(sock)
    init = connection.receive()
    if not isinstance(init, protocol.Init):
        print(f"sandbox-runtime child: expected an init frame, got {init!r}", file=sys.stderr)
        os._exit(2)

    _apply_process_settings(init)
    # The reader thread needs the GIL to abort a signal. With CPython's default 5 ms switch
    # interval, a processor busy in Python code would observe a cancel up to about 5 ms late.
    sys.setswitchinterval(CHILD_SWITCH_INTERVAL_S)
    for entry in reversed(init.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)

    try:
        processor = load_processor(init)
    except ProcessorLoadError as error:
        connection.send(_load_failed(error))
        _flush_std_streams()
        os._exit(1)

    runtime = ChildRuntime(connection, processor, init.cgroup_dir)
    runtime.serve()


def _apply_process_settings(init: protocol.Init) -> None:
    if init.core_dumps:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    else:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if init.address_space_limit_mb:
        # Inherited by every process the job starts; each one gets the whole limit for itself.
        limit = init.address_space_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if init.no_new_privileges:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    try:
        os.chdir("/")
    except OSError:
        pass


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        print(f"sandbox-runtime child: prctl({option}) failed: {os.strerror(errno)}", file=sys.stderr)


# Loading the processor.


def load_processor(init: protocol.Init) -> Callable[..., Any]:
    """Load the processor named by ``init``; raise ProcessorLoadError saying whether a retry can help."""
    if init.processor_pickle is not None:
        processor = _load_pickled(init.processor_pickle)
    elif init.processor_ref:
        processor = _load_reference(init.processor_ref)
    else:
        raise ProcessorLoadError(ValueError("no processor given"), retryable=False)
    if not callable(processor):
        error = TypeError(f"processor {init.processor_ref or 'from pickle'} is {type(processor).__name__}, not callable")
        raise ProcessorLoadError(error, retryable=False)
    return processor


def _load_pickled(encoded: str) -> Callable[..., Any]:
    try:
        payload = base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise ProcessorLoadError(exc, retryable=False) from exc
    try:
        import cloudpickle

        return cloudpickle.loads(payload)
    except (ImportError, AttributeError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ProcessorLoadError(exc, retryable=False) from exc
    except Exception as exc:
        # pickle.UnpicklingError and friends: corrupt bytes never load on a retry.
        import pickle

        raise ProcessorLoadError(exc, retryable=not isinstance(exc, pickle.UnpicklingError)) from exc


def _load_reference(reference: str) -> Callable[..., Any]:
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        error = ValueError(f"processor {reference!r} is not of the form package.module:function or path/file.py:function")
        raise ProcessorLoadError(error, retryable=False)
    module = _import_target(target)
    value: Any = module
    try:
        for part in attribute.split("."):
            value = getattr(value, part)
    except AttributeError as exc:
        raise ProcessorLoadError(exc, retryable=False) from exc
    return value


def _import_target(target: str) -> Any:
    try:
        if target.endswith(".py"):
            return _import_file(target)
        return importlib.import_module(target)
    except ProcessorLoadError:
        raise
    except (ModuleNotFoundError, SyntaxError, FileNotFoundError) as exc:
        raise ProcessorLoadError(exc, retryable=False) from exc
    except Exception as exc:
        raise ProcessorLoadError(exc, retryable=True) from exc


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"processor file {path} does not exist")
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = "sandbox_processor_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ProcessorLoadError(ImportError(f"cannot load {path} as a Python module"), retryable=False)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _load_failed(error: ProcessorLoadError) -> protocol.LoadFailed:
    exc = error.exc
    return protocol.LoadFailed(
        exc_type=type(exc).__name__,
        message=_safe_str(exc),
        traceback=_format_traceback(exc),
        retryable=error.retryable,
    )


def processor_arity(processor: Callable[..., Any]) -> int:
    """Return how many of (job, token, signal) to pass, following bullmq.Worker's rule.

    ``*args`` counts as wanting all three; a callable whose signature cannot be read gets the job only.
    """
    try:
        parameters = inspect.signature(processor).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = 0
    for parameter in parameters:
        if parameter.kind == inspect.Parameter.VAR_POSITIONAL:
            return 3
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return max(1, min(positional, 3))


# Running jobs.


class ChildRuntime:
    def __init__(self, connection: protocol.BlockingConnection, processor: Callable[..., Any], cgroup_dir: str | None) -> None:
        self._connection = connection
        self._processor = processor
        self._arity = processor_arity(processor)
        self._cgroup_dir = cgroup_dir
        self._jobs: queue.Queue[JobContext | None] = queue.Queue()
        self._lock = threading.Lock()
        self._contexts: dict[str, JobContext] = {}
        self._running: JobContext | None = None
        self._terminating = False
        self._loop: Any = None  # the asyncio event loop, created by the first async processor

    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(PARENT_DEATH_SIGNAL, self._on_parent_death)
        reader = threading.Thread(target=self._read_frames, name="sandbox-runtime-reader", daemon=True)
        reader.start()
        self._connection.send(protocol.Ready(pid=os.getpid(), arity=self._arity))
        try:
            while True:
                context = self._jobs.get()
                if context is None:
                    break
                self._run_job(context)
                if self._terminating:
                    # The processor caught JobTerminated and went on: this child is still being stopped.
                    break
        except JobTerminated:
            pass
        _flush_std_streams()
        os._exit(143 if self._terminating else 0)

    def _on_parent_death(self, signum: int, frame: Any) -> None:
        # The reader thread does the same when the socket closes; whichever runs first ends the tree.
        self._end_process_tree()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._terminating:
            return
        self._terminating = True
        raise JobTerminated("SIGTERM received: the supervisor is stopping this job")

    # Reader thread.

    def _read_frames(self) -> None:
        while True:
            try:
                message = self._connection.receive()
            except (OSError, protocol.FrameError) as exc:
                print(f"sandbox-runtime child: protocol connection failed: {exc}", file=sys.stderr)
                message = None
            if message is None:
                _note("protocol connection closed; ending the process tree")
                self._end_process_tree()
                return
            self._dispatch(message)

    def _dispatch(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Start):
            context = JobContext(message, AbortController())
            with self._lock:
                self._contexts[context.job_id] = context
            self._jobs.put(context)
        elif isinstance(message, protocol.Cancel):
            with self._lock:
                context = self._contexts.get(message.job_id)
            if context is not None and context.controller.abort(message.reason):
                self._send_quietly(protocol.CancelSeen(job_id=message.job_id, seen_ns=time.monotonic_ns()))
        elif isinstance(message, protocol.Stop):
            self._jobs.put(None)
        else:
            print(f"sandbox-runtime child: unexpected frame {message!r}", file=sys.stderr)

    def _end_process_tree(self) -> None:
        """Kill every process of this child's tree, this one last: the supervisor is gone."""
        if self._cgroup_dir:
            try:
                with open(os.path.join(self._cgroup_dir, "cgroup.kill"), "w") as handle:
                    handle.write("1")
            except OSError:
                pass
        try:
            import psutil

            for process in psutil.Process().children(recursive=True):
                try:
                    process.kill()
                except psutil.Error:
                    pass
        except Exception:
            pass
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(EXIT_PARENT_GONE)

    # Main thread.

    def _run_job(self, context: JobContext) -> None:
        start = context.start
        job_fields = dict(start.job)
        job_fields["token"] = start.token
        job = SandboxedJob(job_fields, start.workdir, self._send_quietly)
        self._running = context
        threads_before = set(threading.enumerate())
        try:
            if start.workdir:
                os.chdir(start.workdir)
            self._send_quietly(protocol.Started(job_id=context.job_id))
            result = self._call_processor(job, start.token, context)
            self._report_leftover_threads(context, threads_before)
            self._report_result(context, result)
        except JobTerminated:
            raise
        except SystemExit as exc:
            _exit_like_system_exit(exc)
        except BaseException as exc:
            self._report_leftover_threads(context, threads_before)
            self._report_failure(context, exc)
        finally:
            self._running = None
            with self._lock:
                self._contexts.pop(context.job_id, None)
            try:
                os.chdir("/")
            except OSError:
                pass

    def _call_processor(self, job: SandboxedJob, token: str | None, context: JobContext) -> Any:
        signal_ = context.controller.signal
        if signal_.aborted:
            # Cancelled between the start frame and now: user code never runs.
            raise AbortError(signal_.reason)
        arguments = (job, token, signal_)[: self._arity]
        result = self._processor(*arguments)
        if inspect.isawaitable(result):
            result = self._run_awaitable(result)
        return result

    def _run_awaitable(self, awaitable: Any) -> Any:
        import asyncio  # only async processors pay for it

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
        task = self._loop.create_task(_await(awaitable))
        try:
            return self._loop.run_until_complete(task)
        except JobTerminated:
            # SIGTERM arrived while the loop waited: cancel the task so its finally blocks run.
            if not task.done():
                task.cancel()
                try:
                    self._loop.run_until_complete(task)
                except BaseException:
                    pass
            raise

    def _report_leftover_threads(self, context: JobContext, before: set[threading.Thread]) -> None:
        """Ask to be retired when the job left threads running: they would run on into the next job."""
        leftovers = [thread for thread in threading.enumerate() if thread not in before and thread.is_alive()]
        if leftovers:
            names = ", ".join(sorted(thread.name for thread in leftovers))
            detail = f"{len(leftovers)} thread(s) still running after the job: {names}"
            self._send_quietly(protocol.Retire(job_id=context.job_id, detail=detail))

    def _report_result(self, context: JobContext, result: Any) -> None:
        try:
            self._connection.send(protocol.Completed(job_id=context.job_id, result=result))
        except (TypeError, ValueError, RecursionError) as exc:
            detail = f"{type(exc).__name__}: {_safe_str(exc)}"
            self._send_final(protocol.ResultInvalid(job_id=context.job_id, detail=detail))
        except OSError:
            self._end_after_broken_connection()

    def _report_failure(self, context: JobContext, exc: BaseException) -> None:
        message = protocol.Failed(
            job_id=context.job_id,
            exc_type=type(exc).__name__,
            message=_safe_str(exc),
            traceback=_format_traceback(exc),
            unrecoverable=any(cls.__name__ == "UnrecoverableError" for cls in type(exc).__mro__),
            aborted=context.controller.signal.aborted,
        )
        self._send_final(message)

    def _send_final(self, message: protocol.Message) -> None:
        try:
            self._connection.send(message)
        except OSError:
            self._end_after_broken_connection()

    def _end_after_broken_connection(self) -> None:
        """Exit: a child that cannot report its job's outcome must not wait for the next job.

        The supervisor is alive in this case, so it kills whatever the job left behind.
        """
        _note("the protocol connection is broken; exiting")
        os._exit(EXIT_PROTOCOL_BROKEN)

    def _send_quietly(self, message: protocol.Message) -> None:
        """Send ``message``; a closed connection is left to the reader thread to handle."""
        try:
            self._connection.send(message)
        except OSError:
            pass


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _exit_like_system_exit(exc: SystemExit) -> None:
    code = exc.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    _flush_std_streams()
    os._exit(status)


def _note(text: str) -> None:
    """Write a line to stderr, which the supervisor logs; a closed stderr (supervisor gone) is ignored."""
    try:
        print(f"sandbox-runtime child: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


def _format_traceback(exc: BaseException) -> str:
    # The frames of this module are the same for every failure, so the traceback starts at user code.
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        text = f"{type(exc).__name__}: {_safe_str(exc)}\n"
    if len(text) > MAX_TRACEBACK_CHARS:
        text = text[: MAX_TRACEBACK_CHARS // 2] + "\n... (traceback truncated) ...\n" + text[-MAX_TRACEBACK_CHARS // 2 :]
    return text
