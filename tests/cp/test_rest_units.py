"""The tenant API's REST conventions as pure functions (``ee.cp.rest``), the version view
(env write-only), the workload hash of a version, and the log follower's polling
(``tenants._follow``) against a scripted app actor under the autojump clock."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import trio

from ee.cp import rest, tenants
from ee.runtime import ActorDead

# ---- cursors -------------------------------------------------------------------------


def test_cursor_pages_through_in_order() -> None:
    c = rest.Cursors(b"k" * 32)
    keys = [f"app-{i:02d}" for i in range(7)]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        args = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page, cursor = c.page("acct-a", "apps", keys, c.request("acct-a", "apps", args))
        seen += page
        if cursor is None:
            break
    assert seen == keys


@pytest.mark.parametrize(("account", "listing"), [("acct-b", "apps"), ("acct-a", "versions/x")])
def test_a_cursor_is_bound_to_its_account_and_list(account: str, listing: str) -> None:
    c = rest.Cursors(b"k" * 32)
    _, cursor = c.page("acct-a", "apps", ["a", "b", "c"], rest.PageRequest(1, None))
    assert cursor is not None
    assert c.decode("acct-a", "apps", cursor) == "a"
    with pytest.raises(rest.RestError) as err:
        c.decode(account, listing, cursor)
    assert err.value.code == "bad_cursor"


@pytest.mark.parametrize("cursor", [
    "", "!!!", "e30", "x" * 3000,
    "eyJhIjogImIiLCAibSI6ICIwMCJ9",  # {"a": "b", "m": "00"}
    # Hostile: JSON nested past the recursion limit, a non-ASCII MAC (compare_digest
    # raises TypeError on those): both were 500s.
    base64.urlsafe_b64encode(b"[" * 1500).decode(),
    base64.urlsafe_b64encode('{"a": "b", "m": "\u00e9"}'.encode()).decode()])
def test_a_forged_or_broken_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(rest.RestError) as err:
        rest.Cursors(b"k" * 32).decode("acct-a", "apps", cursor)
    assert err.value.code == "bad_cursor"


def test_a_cursor_from_another_cp_process_is_refused() -> None:
    _, cursor = rest.Cursors(b"1" * 32).page("a", "apps", ["x", "y"], rest.PageRequest(1, None))
    assert cursor is not None
    with pytest.raises(rest.RestError):
        rest.Cursors(b"2" * 32).decode("a", "apps", cursor)


@pytest.mark.parametrize("limit", ["0", "501", "-1", "1e3", "²", "", "abc"])
def test_limit_is_1_to_500(limit: str) -> None:
    with pytest.raises(rest.RestError) as err:
        rest.Cursors(b"k" * 32).request("a", "apps", {"limit": limit})
    assert err.value.field == "limit"


# ---- idempotency ---------------------------------------------------------------------

OK = rest.Answer(201, b'{"name": "x"}', "application/json", "/api/v2/apps/x")


def test_same_key_same_request_replays_the_first_answer() -> None:
    keys = rest.IdempotencyKeys()
    assert keys.begin("a", "k1", "fp", 0.0) == rest.Run()
    assert keys.begin("a", "k1", "fp", 1.0) == rest.Conflict("idempotency_in_progress")
    keys.finish("a", "k1", OK)
    assert keys.begin("a", "k1", "fp", 2.0) == rest.Replay(OK)
    assert keys.begin("a", "k1", "other", 3.0) == rest.Conflict("idempotency_conflict")


def test_keys_are_scoped_to_the_account() -> None:
    keys = rest.IdempotencyKeys()
    keys.begin("a", "k1", "fp", 0.0)
    keys.finish("a", "k1", OK)
    assert keys.begin("b", "k1", "fp", 1.0) == rest.Run()


def test_refusals_and_failures_are_not_kept() -> None:
    keys = rest.IdempotencyKeys()
    keys.begin("a", "k", "fp", 0.0)
    keys.finish("a", "k", rest.Answer(409, b"{}", "application/json", None))
    assert keys.begin("a", "k", "fp", 1.0) == rest.Run()
    keys.abandon("a", "k")
    assert keys.begin("a", "k", "fp", 2.0) == rest.Run()


def test_keys_expire_and_are_capped() -> None:
    keys = rest.IdempotencyKeys(ttl_s=10.0, per_account=2, total=3)
    for i in range(3):
        keys.begin("a", f"k{i}", "fp", float(i))
        keys.finish("a", f"k{i}", OK)
    assert len(keys) == 2  # the oldest of account a went
    assert keys.begin("a", "k0", "fp", 3.0) == rest.Run()
    keys.begin("b", "x", "fp", 4.0)
    keys.begin("c", "y", "fp", 5.0)
    assert len(keys) == 3  # total cap
    assert keys.begin("c", "z", "fp", 100.0) == rest.Run()
    assert len(keys) == 1  # the rest expired


def test_kept_answers_are_capped_in_bytes() -> None:
    """A version's answer carries its compose file (up to 1 MiB): 1000 keys of those per
    account were 1 GB of CP memory. Kept answers are budgeted in bytes too."""
    big = rest.Answer(201, b"x" * 400, "application/json", "/api/v2/apps/x")
    size = 400 + len("/api/v2/apps/x") + len("application/json")
    keys = rest.IdempotencyKeys(bytes_per_account=2 * size, total_bytes=3 * size)
    for i in range(3):
        assert keys.begin("a", f"k{i}", "fp", float(i)) == rest.Run()
        keys.finish("a", f"k{i}", big)
    assert keys.kept_bytes == 2 * size  # the oldest of account a went
    assert keys.begin("a", "k0", "fp", 3.0) == rest.Run()
    keys.abandon("a", "k0")
    assert keys.begin("a", "k2", "fp", 4.0) == rest.Replay(big)
    for account in ("b", "c"):
        keys.begin(account, "k", "fp", 5.0)
        keys.finish(account, "k", big)
    assert keys.kept_bytes <= 3 * size  # in all
    assert keys.begin("c", "k", "fp", 6.0) == rest.Replay(big)  # the newest stays
    # Larger than an account's whole budget: not kept (a retry runs again).
    keys.begin("d", "huge", "fp", 7.0)
    keys.finish("d", "huge", rest.Answer(201, b"x" * (3 * size), "application/json", None))
    assert keys.begin("d", "huge", "fp", 8.0) == rest.Run()
    assert keys.kept_bytes <= 3 * size


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "ключ", "a\nb"])
def test_bad_idempotency_keys(key: str) -> None:
    with pytest.raises(rest.RestError) as err:
        rest.idempotency_key(key)
    assert err.value.code == "bad_idempotency_key"


def test_fingerprint_separates_its_parts() -> None:
    assert rest.fingerprint("POST", "/a", "x", b"b") != rest.fingerprint("POST", "/ax", "", b"b")
    assert rest.fingerprint("POST", "/a", "", b"1") != rest.fingerprint("POST", "/a", "", b"2")


# ---- timestamps, fields --------------------------------------------------------------

@pytest.mark.parametrize(("given", "normal"), [
    ("2026-12-01T07:40:37Z", "2026-12-01T07:40:37Z"),
    ("2026-12-01t07:40:37.5z", "2026-12-01T07:40:37.5Z"),
    ("2026-12-01T09:40:37.123456789+02:00", "2026-12-01T07:40:37.123456789Z"),
    ("2026-12-01T00:10:00-01:00", "2026-12-01T01:10:00Z"),
])
def test_rfc3339_is_normalised_to_utc(given: str, normal: str) -> None:
    assert rest.parse_rfc3339(given) == normal


@pytest.mark.parametrize("bad", ["2026-12-01", "2026-12-01 07:40:37Z", "2026-13-01T00:00:00Z",
                                 "2026-12-01T07:40:37", "yesterday", "2026-12-01T25:00:00Z",
                                 "2026-12-01T07:40:37.1234567890Z",
                                 # digits of other scripts (\\d without re.ASCII took them)
                                 "\u0662\u0660\u0662\u0666-12-01T07:40:37Z",
                                 "2026-12-01T07:40:37.\u0662Z"])
def test_rfc3339_refuses_the_rest(bad: str) -> None:
    with pytest.raises(rest.RestError):
        rest.parse_rfc3339(bad)


def test_instants_order_as_times_not_strings() -> None:
    # Docker trims trailing zeros: as strings "...37.5Z" > "...37.123Z" > "...37Z".
    a, b, c = (rest.instant_key(t) for t in ("2026-12-01T07:40:37Z",
                                             "2026-12-01T07:40:37.123Z",
                                             "2026-12-01T07:40:37.5Z"))
    assert a is not None and b is not None and c is not None and a < b < c
    assert tenants._instant_text(b) == "2026-12-01T07:40:37.123000000Z"
    assert rest.rfc3339(0) == "1970-01-01T00:00:00Z"


def test_unknown_fields_are_named() -> None:
    rest.check_fields({"name": 1}, ("name",))
    with pytest.raises(rest.RestError) as err:
        rest.check_fields({"name": 1, "colour": 2}, ("name",), "constraints.")
    assert (err.value.code, err.value.field) == ("unknown_field", "constraints.colour")


# ---- versions: the workload hash, env write-only -------------------------------------

BODY = {"version": "1", "compose": "services:\n  web:\n    image: x\n", "expose_port": 80,
        "env": {"GREETING": "s3cret-value"}}


def spec(**changes: Any) -> dict[str, Any]:
    return tenants._checked_version({**BODY, **changes}, None, 0.0)


def test_everything_but_secret_values_is_in_the_hash() -> None:
    base = spec()["compose_hash"]
    assert spec(env={"GREETING": "other"})["compose_hash"] != base
    assert spec(env={"GREETING2": "s3cret-value"})["compose_hash"] != base
    assert spec(expose_port=81)["compose_hash"] != base
    assert spec(health_path="/health")["compose_hash"] != base
    assert spec(compose="services:\n  web:\n    image: x\n  db:\n    image: y\n",
                expose_service="db")["compose_hash"] != spec(
        compose="services:\n  web:\n    image: x\n  db:\n    image: y\n")["compose_hash"]
    with_secret = spec(secrets=[{"name": "db", "as": "file"}])["compose_hash"]
    assert with_secret != base
    # the secret's form (file or env) is the version's, its value never enters
    assert spec(version="2")["compose_hash"] == base


def test_a_version_view_shows_env_names_never_values() -> None:
    view = tenants._public_version(spec(env={"B": "v1", "A": "v2"}))
    assert view["env_names"] == ["A", "B"]
    assert "env" not in view and "v1" not in json.dumps(view) and "v2" not in json.dumps(view)
    assert view["created_at"] == "1970-01-01T00:00:00Z"


@pytest.mark.parametrize(("extra", "field"), [
    ({"colour": "blue"}, "colour"),
    ({"secrets": [{"name": "db", "as": "file", "mode": "0600"}]}, "secrets[0].mode"),
])
def test_a_version_with_an_unknown_field_is_refused(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(rest.RestError) as err:
        spec(**extra)
    assert (err.value.code, err.value.field) == ("unknown_field", field)


# ---- following logs ------------------------------------------------------------------

class ScriptedApp:
    """Answers the follower's asks as an AppActor would, from a list of log lines that
    grows while it runs; honours ``since``/``service`` only through ``_filter_logs``
    (as an actor that does not take them yet)."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.state = "running"
        self.gone = False
        self.asked_since: list[str | None] = []

    async def ask(self, msg: object, timeout: float) -> Any:
        if self.gone:
            raise ActorDead("app/x")
        if type(msg).__name__ == "GetDeployment":
            return {"deployment_id": "dep-1", "state": self.state}
        raise AssertionError(f"unexpected ask {msg!r}")

    async def logs(self, tail: int, since: str | None) -> dict[str, Any] | None:
        if self.gone:
            raise ActorDead("app/x")
        self.asked_since.append(since)
        return {"deployment_id": "dep-1",
                "replicas": [{"agent_id": "ag-1", "lines": list(self.lines)}]}


def events(chunks: list[bytes]) -> list[tuple[str | None, dict[str, Any]]]:
    out = []
    for chunk in chunks:
        text = chunk.decode()
        if text.startswith(":"):
            continue
        kind = None
        for line in text.strip().splitlines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[len("data: "):])))
    return out


def line(at: str, text: str, service: str = "web") -> dict[str, Any]:
    return {"at": at, "service": service, "text": text}


async def collect(app: ScriptedApp, query: tenants.LogsQuery, script: Any) -> list[bytes]:
    got: list[bytes] = []
    ended = []

    async def read() -> None:
        async for chunk in tenants._follow(app, "dep-1", query, app.logs,
                                           lambda: ended.append(1)):
            got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await script()
    assert ended == [1]
    return got


async def test_follow_sends_each_line_once_in_order_and_ends_when_stopped(
        autojump_clock: trio.abc.Clock) -> None:
    app = ScriptedApp()
    app.lines = [line("2026-12-01T07:00:00.5Z", "a"), line("2026-12-01T07:00:01Z", "b"),
                 line("2026-12-01T07:00:01Z", "b2", service="db")]

    async def script() -> None:
        await trio.sleep(2.5)
        app.lines.append(line("2026-12-01T07:00:01Z", "c"))  # same instant as b: still new
        app.lines.append(line("2026-12-01T07:00:01.25Z", "d"))
        await trio.sleep(3)
        app.state = "stopped"

    got = await collect(app, tenants.LogsQuery(service="web", follow=True), script)
    evs = events(got)
    assert [e["text"] for k, e in evs if k is None] == ["a", "b", "c", "d"]
    assert evs[-1] == ("end", {"reason": "stopped"})
    assert all(e["agent_id"] == "ag-1" and e["service"] == "web" for k, e in evs if k is None)
    assert b"id: 2026-12-01T07:00:01.250000000Z\n" in b"".join(got)


async def test_follow_honours_since_and_ends_when_the_app_is_gone(
        autojump_clock: trio.abc.Clock) -> None:
    app = ScriptedApp()
    app.lines = [line("2026-12-01T07:00:00Z", "old"), line("2026-12-01T07:00:05Z", "new")]

    async def script() -> None:
        await trio.sleep(2.5)
        app.gone = True

    got = await collect(app, tenants.LogsQuery(since="2026-12-01T07:00:01Z", follow=True),
                        script)
    evs = events(got)
    assert [e["text"] for k, e in evs if k is None] == ["new"]
    assert evs[-1] == ("end", {"reason": "gone"})


async def test_follow_is_bounded_in_time(autojump_clock: trio.abc.Clock) -> None:
    app = ScriptedApp()

    async def script() -> None:
        pass

    start = trio.current_time()
    got = await collect(app, tenants.LogsQuery(follow=True), script)
    assert trio.current_time() - start >= tenants.FOLLOW_MAX_S
    assert events(got)[-1] == ("end", {"reason": "max_duration"})
    assert b": keepalive\n\n" in got
