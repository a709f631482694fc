"""One guardrail pass: scrape both stacks' ``/metrics``, observe, maybe step back.

Shared by ``ee-router`` (which adds what it relayed itself, ``Seen``) and ``eectl
rollout guard`` (the Cloudflare Worker's guard, which has only the stacks' metrics).
The pure part is ``guardrails``; this keeps the state between passes: the evaluator's
breach clocks and each stack's last good scrape (the base of the next deltas; a failed
scrape keeps the older base, so the next good one covers both intervals).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Final

import attrs
import httpx
import trio

from ee.router.decision import STACKS, RolloutConfig
from ee.router.guardrails import (
    Evaluator,
    Samples,
    Seen,
    StepBack,
    parse_prometheus,
    stack_interval,
    triggers_from_json,
)

log = logging.getLogger("ee.router.guard")

SCRAPE_ATTEMPTS: Final = 3
SCRAPE_TIMEOUT_S: Final = 5.0
METRICS_BYTES: Final = 8 << 20


async def scrape(client: httpx.AsyncClient, url: str,
                 attempts: int = SCRAPE_ATTEMPTS) -> tuple[Samples | None, int]:
    """The samples at *url* and how many attempts failed before (all of them: None)."""
    failed = 0
    for _ in range(attempts):
        try:
            with trio.fail_after(SCRAPE_TIMEOUT_S):
                # its own connection: a kept-alive one was seen to hang the next request
                # on it once a test clock had jumped
                async with client.stream("GET", url, headers={"Connection": "close"}) as r:
                    body = bytearray()
                    async for chunk in r.aiter_bytes():
                        body += chunk
                        if len(body) > METRICS_BYTES:
                            raise ValueError(f"{url}: over {METRICS_BYTES} bytes")
            if r.status_code == 200:
                text = body.decode("utf-8", "replace")
                # up to METRICS_BYTES of text: parsed off the event loop (the router's)
                return await trio.to_thread.run_sync(parse_prometheus, text), failed
            log.warning("scrape %s: %s", url, r.status_code)
        except (httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
            log.warning("scrape %s: %s", url, exc)
        failed += 1
    return None, failed


@attrs.define
class Guard:
    metrics_urls: Mapping[str, str]  # stack -> its /metrics URL
    client: httpx.AsyncClient
    evaluator: Evaluator = attrs.field(factory=Evaluator)
    last: dict[str, Samples] = attrs.field(factory=dict)

    async def observe(self, config: RolloutConfig,
                      seen: Mapping[str, Seen] | None = None) -> StepBack | None:
        """One pass over the interval since the last; the step-back it calls for, if any
        (not applied: the caller writes the config where it lives). Raises
        ``ConfigError`` when *config* carries invalid guardrails."""
        triggers = triggers_from_json(config.extra.get("guardrails"))
        self.evaluator = attrs.evolve(self.evaluator, triggers=triggers)
        scraped = {s: await scrape(self.client, self.metrics_urls[s]) for s in STACKS}
        # A failed scrape counts as the stack's 5xx only for the new stack (a dead new
        # stack is not unobserved); the baseline's is no data: counted as its 5xx, one
        # blip of the old stack's /metrics cleared the new stack's breach clock.
        intervals = {s: stack_interval(None if seen is None else seen[s], scraped[s][0],
                                       self.last.get(s),
                                       scraped[s][1] if s == "new" else 0) for s in STACKS}
        for s in STACKS:
            samples = scraped[s][0]
            if samples is not None:
                self.last[s] = samples
        self.evaluator, fired = self.evaluator.observe(
            trio.current_time(), intervals["old"], intervals["new"], config)
        return fired
