"""Review 27: ``IdentityBook.views`` verifies pending bindings in worker threads.

* Concurrent views (an admin console refreshing, two operators) and the background
  verifier verify each pending binding once, not once per caller: N callers must not
  cost N times 10,000 signatures (and N worker threads of them).
* A name released while a view's worker thread is verifying its batch stays released:
  the thread's late result (read before the file was deleted) does not bring it back.
* (What chaos sparing /metrics hid: see the last test.)
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ee.actors.identity import Binding
from ee.cp.identities import VERIFY_BATCH, IdentityBook
from ee.cp.manifests import ManifestStore
from ee.router.decision import RolloutConfig
from ee.router.guard import Guard

NAMES = VERIFY_BATCH + 50


def _book(tmp_path: Path) -> IdentityBook:
    store = ManifestStore(tmp_path / "manifests", Ed25519PrivateKey.generate())
    for i in range(NAMES):
        name = f"vm-{i:05d}"
        store.write("bindings", name, Binding(name, os.urandom(32), 1.0, f"agt-{i}").to_spec())
    events: list[Any] = []
    return IdentityBook(store, lambda *e: events.append(e), verify_after_s=3600)


async def test_concurrent_views_verify_each_binding_once(tmp_path: Path) -> None:
    book = _book(tmp_path)
    verified: Counter[str] = Counter()
    lock = threading.Lock()
    real = book._verify

    def counting(path: Path, name: str | None) -> Any:
        with lock:
            verified[str(name)] += 1
        return real(path, name)

    book._verify = counting  # type: ignore[method-assign]
    views: list[list[dict[str, Any]]] = []

    async def view() -> None:
        views.append(await book.views())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(book.run)
            async with trio.open_nursery() as callers:
                for _ in range(4):
                    callers.start_soon(view)
            book.request_stop()
    assert len(views) == 4 and all(len(v) == NAMES for v in views)
    assert set(verified.values()) == {1}, verified.most_common(3)


async def test_a_name_released_during_a_views_batch_stays_released(tmp_path: Path) -> None:
    book = _book(tmp_path)
    victim = "vm-00007"
    in_thread = threading.Event()
    released = threading.Event()
    real = book._verify

    def slow(path: Path, name: str | None) -> Any:
        found = real(path, name)  # read before the release deletes the file
        if name == victim and threading.current_thread() is not threading.main_thread():
            in_thread.set()
            released.wait(30)
        return found

    book._verify = slow  # type: ignore[method-assign]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(book.run)
            nursery.start_soon(book.views)
            await trio.to_thread.run_sync(in_thread.wait, 30)
            assert await book.release(victim) is not None
            released.set()
            names = [v["vm_name"] for v in await book.views()]
            book.request_stop()
    assert victim not in names and victim not in book.bindings
    assert not book.manifests.path("bindings", victim).exists()


# ---- chaos spares /metrics: what it hid in the guard ------------------------------------
#
# The injected 500s failed the stacks' /metrics scrapes at random, and the guard's test
# flaked: sparing /metrics fixed the test, not the guard. A failed scrape counts as one
# answered 5xx of that stack (``stack_interval``); of the *old* stack (the baseline),
# that is a 100% error share, which no new share can exceed by the threshold: the pass
# clears the new stack's breach clock. Outside any drill, an old stack whose /metrics
# fails once per window (overload, a network blip, someone flooding it) keeps a new stack
# that answers half its requests 5xx from ever being stepped back.


async def test_a_failing_baseline_scrape_does_not_reset_the_breach_clock(
        autojump_clock: trio.testing.MockClock) -> None:
    passes = [0]

    def metrics(request: httpx.Request) -> httpx.Response:
        # The Worker's guard has only the stacks' metrics: 100 answers a pass each, the
        # new stack's half 5xx.
        n = passes[0] + 1
        if request.url.host == "old":
            if passes[0] % 10 == 9:  # the baseline's /metrics fails once per 150 s
                return httpx.Response(503, text="overloaded")
            text = f'ee_http_responses_total{{code="2xx"}} {100 * n}\n'
        else:
            text = (f'ee_http_responses_total{{code="2xx"}} {50 * n}\n'
                    f'ee_http_responses_total{{code="5xx"}} {50 * n}\n')
        return httpx.Response(200, text=text)

    config = RolloutConfig(points={"A": 10, "B": 10, "D": 10})
    fired = None
    async with httpx.AsyncClient(transport=httpx.MockTransport(metrics)) as client:
        guard = Guard({"old": "http://old/metrics", "new": "http://new/metrics"}, client)
        for passes[0] in range(40):  # a pass every 15 s: 600 s, twice the 300 s window
            fired = await guard.observe(config)
            if fired is not None:
                break
            await trio.sleep(15)
    assert fired is not None and fired.trigger == "error_rate"
