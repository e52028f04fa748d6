"""The one docker container runner: a command in an image, as the user, logs to a sink, then gone.

Every container kvmlab runs for a build goes through ``run_in_container``: the qemu build, the
runtime-deps probe, the kmod prepare and make steps (and make install, for the install room).
It runs the command as the calling user's uid:gid with no network, binds the given host paths,
streams the output to a sink, kills the container after ``timeout`` seconds (a silent, hung
build still ends) and removes it whatever happens: normal end, error, Ctrl-C or SIGTERM (inside
``kvmlab.core.proc.sigterm_as_interrupt``). Every container carries the label ``LABEL``.

``LogSink`` is the usual sink: the log file, the terminal unless quiet, and the last lines for
the error message.
"""
from __future__ import annotations

import collections
import os
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from kvmlab.core import ui
from kvmlab.core.errors import BuildError, DockerError

LABEL = "io.kvmlab.build.qemu"      # on every container kvmlab runs (tests and cleanup find them)
CCACHE_VOLUME = "kvmlab-ccache"      # KVMLAB_CCACHE_VOLUME overrides it (benchmarks: a cold cache)
CCACHE_DIR = "/ccache"
CONTAINER_PATH = ("/usr/lib/ccache:/usr/lib64/ccache:/usr/local/sbin:/usr/local/bin:"
                  "/usr/sbin:/usr/bin:/sbin:/bin")
TAIL_LINES = 40
WAIT_AFTER_LOGS = 120                # seconds to wait for the exit status once the logs ended


class Sink(Protocol):
    def write(self, text: str) -> Any: ...


class LogSink:
    """Writes output to the terminal (unless quiet) and the log file; keeps the tail."""

    def __init__(self, path: Path, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = ""
        self._f = open(path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        if not self.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        self.tail.extend(lines)

    def close(self) -> None:
        if self._f.closed:
            return
        if self._partial:
            self.tail.append(self._partial)
            self._partial = ""
        self._f.close()

    def show_tail(self) -> None:
        print(f"---- last {len(self.tail)} lines of {self.path} ----", file=sys.stderr)
        for ln in self.tail:
            print(ln, file=sys.stderr)
        print("----", file=sys.stderr, flush=True)


def ccache_volume() -> str:
    return os.environ.get("KVMLAB_CCACHE_VOLUME") or CCACHE_VOLUME


def build_binds(tree: Path) -> dict[str, str]:
    """The binds of a build container: the tree at its own absolute path (its Makefiles then
    also work from the host) and the shared ccache volume."""
    return {str(tree): str(tree), ccache_volume(): CCACHE_DIR}


def container_name(*parts: str) -> str:
    """kvmlab-<parts>-<pid>, with characters docker does not accept replaced by '-'."""
    return "-".join(["kvmlab", *(re.sub(r"[^A-Za-z0-9_.-]", "-", p) for p in parts),
                     str(os.getpid())])


def run_in_container(client: Any, image: str, command: str | Sequence[str], *, workdir: str | Path,
                     binds: Mapping[str, str], env: Mapping[str, str], sink: Sink, name: str,
                     timeout: float, labels: Mapping[str, str] | None = None,
                     what: str = "build", hint: str | None = None) -> int:
    """Run ``command`` (a shell script, or an argument list) in ``image`` and return its exit
    status. binds: host path or volume name -> path in the container (read-write). A timeout
    stops the container and raises BuildError naming ``what``; docker API errors are a
    DockerError. The container is removed in every case."""
    from docker.errors import APIError
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    container = None
    try:
        container = client.containers.run(
            image, argv, detach=True, name=name, user=f"{os.getuid()}:{os.getgid()}",
            working_dir=str(workdir), network_mode="none", environment=dict(env),
            volumes={src: {"bind": dst, "mode": "rw"} for src, dst in binds.items()},
            labels={LABEL: "1", **(labels or {})})
        return _follow(container, sink, timeout, what,
                       hint or f"set KVMLAB_BUILD_TIMEOUT (seconds); log: "
                               f"{getattr(sink, 'path', '-')}")
    except APIError as e:
        raise DockerError(f"docker could not run the {what}: {e.explanation or e}") from None
    finally:
        _remove(client, container, name)


def _follow(container: Any, sink: Sink, timeout: float, what: str, hint: str) -> int:
    """Stream the container's output to sink until it ends or the timeout kills it."""
    timed_out = threading.Event()

    def watchdog() -> None:
        timed_out.set()
        try:
            container.kill()
        except Exception:  # noqa: BLE001 - it may have just ended
            pass

    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        for chunk in container.logs(stream=True, follow=True):
            sink.write(chunk.decode("utf-8", errors="replace"))
        res = container.wait(timeout=WAIT_AFTER_LOGS)
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise BuildError(f"{what} timed out after {timeout:.0f} s and was stopped", hint=hint)
    return int(res.get("StatusCode", 1))


def _remove(client: Any, container: Any, name: str) -> None:
    """Remove the container; by name when run() was interrupted before it returned one."""
    from docker.errors import NotFound
    try:
        if container is not None:
            container.remove(force=True)
        else:
            client.containers.get(name).remove(force=True)
    except NotFound:
        pass
    except Exception as e:  # noqa: BLE001 - report but do not mask the original error
        ui.warn(f"could not remove container {name}: {e}")


def export_image_fs(client: Any, image: str, dest: Path, *, name: str) -> None:
    """Write the filesystem of ``image`` as a tar file ``dest`` (atomically): a container is
    created (never started), exported and removed whatever happens."""
    from docker.errors import APIError
    container = None
    tmp = dest.with_name(dest.name + ".part")
    try:
        container = client.containers.create(image, ["/bin/true"], name=name,
                                              labels={LABEL: "1"})
        with open(tmp, "wb") as f:
            for chunk in container.export(chunk_size=1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except APIError as e:
        raise DockerError(f"docker could not export {image}: {e.explanation or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        _remove(client, container, name)
