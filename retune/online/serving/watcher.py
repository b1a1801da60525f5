"""The model watcher: `ModelWatcher` serves the version the registry alias points at and, from a
background thread, loads a new version fully before swapping it in when the alias moves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from retune.online.serving.errors import ApiError
from retune.online.serving.generation import ServedModel, load_served

if TYPE_CHECKING:
    from retune.release.registry import Registry

T = TypeVar("T")

# A failed load of one version is retried no sooner than this, so a broken artifact does not
# reload every poll.
RETRY_FAILED_LOAD_S = 60.0


def in_passing_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a thread that ends when it returns (its result or its exception here).

    Loading a model runs torch's CPU ops, and each thread that does keeps a pool of worker
    threads while it lives, which then compete with generation's own: on 2 cores a long-lived
    thread that once loaded a model made every later decoding step ~1.7x slower. So everything
    but generation that touches torch in the server runs on a thread that goes away."""
    result: list[T] = []
    failure: list[BaseException] = []

    def call() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=call, name="retune-load", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def log(message: str) -> None:
    """One line of the server's log, on stdout."""
    print(f"serve: {message}", flush=True)


class ModelWatcher:
    """Serves the version the alias points at; a background thread polls the registry and,
    when the alias moves, loads the new version fully before swapping it in."""

    def __init__(
        self,
        registry: Registry,
        alias: str,
        interval_s: float,
        loader: Callable[[str, int], ServedModel] = load_served,
    ) -> None:
        self.registry, self.alias, self.interval_s = registry, alias, interval_s
        self._loader = loader
        self._current: ServedModel | None = None
        self._failed: tuple[int, float] | None = None  # version, monotonic time of the failure
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    @property
    def current(self) -> ServedModel | None:
        return self._current

    @property
    def uri(self) -> str:
        return f"models:/{self.registry.model_name}@{self.alias}"

    def poll(self) -> None:
        """One check: where does the alias point; load and swap if it moved."""
        with self._poll_lock:
            try:
                target = self.registry.aliases().get(self.alias)
            except Exception as exc:  # the store may be briefly unreachable: keep serving
                self.last_error = f"could not read {self.uri} from the registry: {exc}"
                log(self.last_error)
                return
            current = self._current
            if target is None:
                if current is not None:
                    self.last_error = (
                        f"{self.uri} points nowhere now; still serving v{current.version}"
                    )
                return
            if current is not None and current.version == target:
                return
            failed = self._failed
            if (
                failed
                and failed[0] == target
                and time.monotonic() - failed[1] < RETRY_FAILED_LOAD_S
            ):
                return
            started = time.perf_counter()
            try:
                loaded = in_passing_thread(self._loader, self.registry.model_name, target)
            except Exception as exc:
                self._failed = (target, time.monotonic())
                self.last_error = f"loading {self.registry.model_name} v{target} failed: {exc}"
                log(
                    self.last_error
                    + ("" if current is None else f"; still serving v{current.version}")
                )
                return
            # One reference assignment: a request sees the old model or the new, never a mix.
            self._current = loaded
            self._failed, self.last_error = None, None
            before = "nothing" if current is None else f"v{current.version}"
            log(
                f"{self.uri} -> v{target} (was {before}): loaded in "
                f"{time.perf_counter() - started:.1f} s, now serving v{target}"
            )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retune-model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def unavailable(self) -> ApiError:
        detail = f" Last error: {self.last_error}" if self.last_error else ""
        return ApiError(
            503,
            f"no model to serve: {self.uri} points at no version yet. Run `retune run` to "
            "train and register one (its gate promotes it), or `retune promote <version>` "
            f"to point {self.alias} at a registered version; this server picks it up within "
            f"{self.interval_s:g} s (serve.reload_interval_s).{detail}",
            code="model_not_loaded",
        )
