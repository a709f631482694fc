"""A 400 for a value an attrs validator refuses names the field and the rule.

attrs' validators (``gt``, ``le``, ``max_len``, ``matches_re``, ``in_``,
``instance_of``) fail inside the class's ``__init__``, after cattrs structured the
fields, so the refusal used to be ``"invalid value"`` with no field, on every route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from cpkit import running_cp

from ee.cp.errors import ApiError, structure_request
from ee.protocol.strict import problems

JOIN = {"token_id": "0" * 32, "proof": "0" * 64, "datacenter": "sim:a",
        "tls_public_key": "x", "signing_key": "0" * 64}


async def test_federation_routes_name_the_field(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_cp(tmp_path / "cp", role="master",
                              federation_listen="127.0.0.1:0") as env, env.client() as admin:
            r = await admin.post("/api/v2/federation/join-tokens", json={"ttl_s": 0})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == "'ttl_s': must be > 0.0"
            assert r.json()["error"]["details"] == {"field": "ttl_s"}
            r = await admin.post("/api/v2/federation/join-tokens", json={"ttl_s": 90000})
            assert r.json()["error"]["message"] == "'ttl_s': must be <= 86400.0"
            r = await admin.post("/api/v2/federation/join", json={**JOIN, "signing_key": "00"})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == \
                "'signing_key': must match '[0-9a-f]{64}', got '00'"
            r = await admin.post("/api/v2/federation/join",
                                 json={**JOIN, "tls_public_key": "k" * 2001})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"] == \
                "'tls_public_key': length must be <= 2000, got 2001"
            assert r.json()["error"]["details"] == {"field": "tls_public_key"}


@attrs.frozen
class Inner:
    colour: str = attrs.field(validator=attrs.validators.in_({"red", "blue"}))
    count: Any = attrs.field(default=1, validator=attrs.validators.instance_of(int))
    name: str = attrs.field(default="a", validator=attrs.validators.matches_re(r"[a-z]+"))
    few: tuple[int, ...] = attrs.field(default=(), validator=attrs.validators.min_len(0))


@attrs.frozen
class Outer:
    inner: Inner
    n: int = attrs.field(default=1, validator=attrs.validators.ge(1))


def refusal(body: object) -> tuple[str, dict[str, Any]]:
    with pytest.raises(ApiError) as info:
        structure_request(body, Outer)
    return info.value.message, info.value.details


def test_every_attrs_validator_names_its_field_without_echoing_the_value() -> None:
    assert refusal({"inner": {"colour": "green"}}) == (
        "'inner.colour': must be one of blue, red, got 'green'", {"field": "inner.colour"})
    assert refusal({"inner": {"colour": "red"}, "n": 0})[0] == "'n': must be >= 1"
    huge = "X" * 1_000_000
    message, _ = refusal({"inner": {"colour": "red", "name": huge}})
    assert message.startswith("'inner.name': must match '[a-z]+', got 'XXXX")
    assert len(message) < 200  # the library's text would repr the whole megabyte
    # A TypeError of instance_of (the field is typed Any, so cattrs passes it through).
    assert problems(TypeError("'count' must be <class 'int'>", attrs.fields(Inner).count,
                              int, "7")) == [("count", "expected int, got '7'")]


def test_other_value_errors_stay_unworded() -> None:
    for exc in (ValueError("invalid literal for int() with base 10: 'x'"),
                ValueError("'x' must be shiny: 5"), TypeError("unhashable type: 'list'")):
        assert problems(exc, "body") == [("body", "invalid value")]
