"""Batched serving: requests that wait for the network together are drawn together, in one call.

A `Lane` draws one network call at a time. Requests that arrive while a call runs wait for it; when it ends,
one of them leads the next call and takes every waiting request with its key (the same model and sampling
settings) into it, up to `max_items` images (fewer where its requests ask: large images on a CPU). Each
request's noise comes from its own seeds, so it gets the images it would get alone, up to float rounding. Masks and settings are checked before a request joins, so a
bad one is refused alone; should a call still fail, each request in it is drawn again alone, and only the one
at fault fails. A request waits on its own thread (gradio's worker); the leader draws on its own, so a ZeroGPU
Space sees one `spaces.GPU` call per batch, made from a request (`on_device` wraps it).

What a call draws is data, not code: a request names its `recipe` (what to draw, e.g. a model and its
settings) and the lane hands recipe and items to its `runner`, which was bound once, before any call. ZeroGPU
runs a call in a forked worker and pickles its arguments there: a recipe and arrays cross, an opened model
never does (the worker has its own copy, from the fork, or opens it).
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError

Progress = Callable[[int, int], None]
Runner = Callable[[object, list, Progress | None], list]  # (recipe, items, progress) -> a result per item

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    key: Hashable
    items: list
    recipe: object
    progress: Progress | None
    most: int  # images a call holding this request may draw
    # A progress bar belongs to its request's context (gradio reads the event from context variables), while
    # the leader's thread calls it: each call runs in a copy of the requester's context.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    results: list | None = None
    error: BaseException | None = None
    done: bool = False

    def report(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.context.run(self.progress, step, total)


class Lane:
    """One network call at a time; what waits meanwhile is drawn together next.

    max_items: images per call (a request bigger than this still runs, alone); 1 draws each request alone.
    wait: a call's leader waits until as many images wait as were asked for during the last call (the images
    it drew and those that arrived while it ran), for at most the last call's time and never more than `wait`
    seconds. Painters whose previews came back together ask again moments apart; without the wait, the first
    to ask would be drawn alone and the rest would wait for that call. Waiting up to one call's time costs the
    leader at most what a call drawn without the others would cost them; counting the requests that arrived
    during a call keeps one left out of it from leaving another out of the next, round after round. A lone
    painter, whose last call drew one image, never waits. on_device: wraps the runner
    (`spaces.GPU` on a ZeroGPU Space); its calls get no progress callback, which could not cross to another
    process.
    """

    def __init__(self, max_items: int = 32, wait: float = 0.5, on_device: Callable | None = None):
        if max_items < 1:
            raise ConfigError(f"batch of {max_items} images: expected at least 1 image per network call")
        self.max_items, self.wait, self.on_device = max_items, wait, on_device
        self._call: Runner | None = None
        self._waiting: list[_Request] = []
        self._busy = False  # a call is being drawn
        self._last = (max_items, math.inf)  # (images, seconds) of the last call: what a leader waits for
        self._changed = threading.Condition()

    @property
    def served(self) -> bool:
        return self._call is not None

    def serve(self, runner: Runner) -> None:
        """Draw every call with `runner(recipe, items, progress)`, wrapped by `on_device`; once, first."""
        self._call = self.on_device(runner) if self.on_device is not None else runner

    def draw(
        self, key: Hashable, items: Sequence, recipe: object, progress: Progress | None = None,
        most: int | None = None,
    ) -> list:  # fmt: skip
        """The runner's results for these items, drawn with any others of the same `key` in one call.

        Requests with equal keys must be drawable in one call by either one's `recipe`, and ask the same
        `most`: images per call, below the lane's `max_items` (a model whose large images draw faster a few at a
        time). Blocks until done; raises what drawing these items alone raised.
        """
        if self._call is None:
            raise RuntimeError("a lane draws only once it is served (Lane.serve)")
        request = _Request(key, list(items), recipe, progress, min(most or self.max_items, self.max_items))
        with self._changed:
            self._waiting.append(request)
            self._changed.notify_all()  # a leader gathering company may take this one
            while self._busy and not request.done:
                self._changed.wait()
            leads = not request.done
            self._busy |= leads
        if leads:
            self._lead(request)
        if request.error is not None:
            raise request.error
        return request.results

    def _lead(self, first: _Request) -> None:
        expected, seconds = self._last
        expected, deadline = min(expected, first.most), time.monotonic() + min(self.wait, seconds)
        with self._changed:
            while self._items(first.key) < expected and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            batch = self._take(first)
        began = time.monotonic()
        try:
            self._run(batch)
        finally:
            with self._changed:
                for request in batch:
                    if request.results is None and request.error is None:  # interrupted (KeyboardInterrupt)
                        request.error = RuntimeError("the batched call was interrupted")
                    request.done = True
                self._busy = False
                asked = sum(len(r.items) for r in batch) + self._items(first.key)  # drawn, and arrived meanwhile
                self._last = (asked, time.monotonic() - began)
                self._changed.notify_all()

    def _items(self, key: Hashable) -> int:
        return sum(len(r.items) for r in self._waiting if r.key == key)

    def _take(self, first: _Request) -> list[_Request]:
        """`first`, then the oldest waiting requests with its key while their images fit `first.most`."""
        batch, size = [first], len(first.items)
        for request in self._waiting:
            fits = size + len(request.items) <= first.most
            if request is not first and request.key == first.key and fits:
                batch.append(request)
                size += len(request.items)
        self._waiting = [r for r in self._waiting if r not in batch]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        items = [item for request in batch for item in request.items]

        def progress(step: int, total: int) -> None:
            for request in batch:
                request.report(step, total)

        try:
            results = self._call(batch[0].recipe, items, progress if self.on_device is None else None)
        except Exception as e:
            if len(batch) == 1:
                batch[0].error = e
                return
            log.warning("a batched call of %d requests failed (%s); drawing each alone", len(batch), e)
            for request in batch:
                self._run([request])
            return
        if len(batch) > 1:
            log.debug("drew %d requests (%d images) in one call", len(batch), len(items))
        start = 0
        for request in batch:
            request.results = list(results[start : start + len(request.items)])
            start += len(request.items)


@dataclass
class Lanes:
    """A studio's two lanes: live previews, and sampling (generate, sweep). They draw beside each other, so a
    stroke never waits for Generate; shared by every model a registry opens, so models take turns too."""

    preview: Lane = field(default_factory=Lane)
    sample: Lane = field(default_factory=Lane)

    def serve(self, runner: Runner) -> Lanes:
        """Serve both lanes with `runner`, unless served already (by the registry that shares them)."""
        for lane in (self.preview, self.sample):
            if not lane.served:
                lane.serve(runner)
        return self
