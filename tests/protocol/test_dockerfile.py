"""Dockerfile checks: no ADD that makes dockerd fetch from the network (pure)."""

from __future__ import annotations

import pytest
from test_compose import make_tar

from ee.protocol.compose import load_build_context, validate_compose
from ee.protocol.dockerfile import check_build_dockerfiles, check_dockerfile, dockerfile_paths
from ee.protocol.workload_policy import WorkloadPolicyError

#: (Dockerfile text, line of the refusal)
REFUSED: list[tuple[str, int]] = [
    ("FROM x\nADD http://127.0.0.1:18777/secret /stolen\n", 2),
    ("FROM x\nadd https://example.com/a /a\n", 2),
    ("FROM x\n  Add   --chown=1:1 ftp://h/a /a\n", 2),
    ('FROM x\nADD ["http://127.0.0.1/s", "/s"]\n', 2),
    ('FROM x\nADD ["http:\\u002f\\u002f127.0.0.1/s", "/s"]\n', 2),  # JSON unescapes
    ("FROM x\nADD http:\\/\\/127.0.0.1/s /s\n", 2),  # the shell-form lexer unescapes
    ("FROM x\nADD git@github.com:o/r.git /src\n", 2),
    ("FROM x\nADD https://github.com/o/r.git#main /src\n", 2),
    ("FROM x\nADD github.com/o/r.git /src\n", 2),
    ("FROM x\nARG U=http://127.0.0.1/s\nADD $U /s\n", 3),
    ("FROM x\nENV U=http://127.0.0.1/s\nADD ${U} /s\n", 3),
    ("FROM x\nADD \\\n  http://127.0.0.1/s \\\n  /s\n", 2),
    ("FROM x\nADD \\\n# a comment inside the continuation\n\n  http://h/s /s\n", 2),
    ("# escape=`\nFROM x\nADD `\n  http://h/s /s\n", 3),
    ("# escape=`\nFROM x\nADD c:\\x /s\n", 3),  # the escape char is ` : \ is refused anyway
    ("FROM x\nONBUILD ADD http://h/s /s\n", 2),
    ("FROM x\nonbuild   add http://h/s /s\n", 2),
    ("FROM x\nADD <<EOF /s\nhello\nEOF\n", 2),
    ("# syntax=docker/dockerfile:1\nFROM x\n", 1),
    ("# escape=x\nFROM x\n", 1),
    ("\ufeffFROM x\nADD http://h/s /s\n", 2),
    ("FROM x\r\nADD http://h/s /s\r\n", 2),
    # Docker would join these differently than a naive parser might: the physical-line
    # check still sees the ADD.
    ("# escape=`\nFROM x\nRUN echo \\\nADD http://h/s /s\n", 4),
]

ALLOWED = [
    "FROM ee-busybox:local\nCOPY www /var/www\nADD app.tar.gz /srv/\n"
    'CMD ["httpd", "-f"]\n',
    "FROM x\nRUN wget -O- http://example.com/ | sh\n",  # RUN egress: the firewall's job
    "FROM x\nCOPY --from=builder /a /b\nADD --chown=1000:1000 a b /dst/\n",
    "# escape=`\nFROM x\nRUN echo a `\n  b\n",
    "# a comment, not a directive: escape=x\nFROM x\n",
]


@pytest.mark.parametrize(("text", "line"), REFUSED)
def test_remote_add_sources_are_refused(text: str, line: int) -> None:
    with pytest.raises(WorkloadPolicyError) as info:
        check_dockerfile(text.encode(), "sub/Dockerfile")
    assert info.value.code == "dockerfile_remote_source"
    assert info.value.path == f"sub/Dockerfile:{line}", str(info.value)


@pytest.mark.parametrize("text", ALLOWED)
def test_local_dockerfiles_are_allowed(text: str) -> None:
    check_dockerfile(text.encode())


def test_dockerfile_paths_follow_each_services_build() -> None:
    doc = validate_compose(
        "services:\n  a: {build: .}\n  b: {build: {context: sub, dockerfile: ../Other}}\n"
        "  c: {build: {context: sub/x}}\n  d: {image: x}\n")
    assert dockerfile_paths(doc) == {
        "Dockerfile": "services.a.build", "dockerfile": "services.a.build",
        "Other": "services.b.build", "sub/x/Dockerfile": "services.c.build",
        "sub/x/dockerfile": "services.c.build"}


def test_build_context_dockerfiles_are_checked_and_links_refused() -> None:
    doc = validate_compose("services:\n  web: {build: {context: app}}\n")
    keep = frozenset(dockerfile_paths(doc))
    good = make_tar([("app/Dockerfile", "file", 0o644, b"FROM x\nCOPY . /\n")])
    check_build_dockerfiles(doc, load_build_context(good, keep_contents=False,
                                                    keep_paths=keep))
    # "dockerfile" is the builder's fallback name
    bad = make_tar([("app/dockerfile", "file", 0o644, b"FROM x\nADD http://h/s /s\n")])
    with pytest.raises(WorkloadPolicyError, match="app/dockerfile:2"):
        check_build_dockerfiles(doc, load_build_context(bad, keep_contents=False,
                                                        keep_paths=keep))
    loaded = load_build_context(bad, keep_contents=False)
    assert loaded.contents == {}  # only what keep_paths names is kept
    link = make_tar([("app/real", "file", 0o644, b"FROM x\n"),
                     ("app/Dockerfile", "symlink", 0o777, "real")])
    with pytest.raises(WorkloadPolicyError, match="symlink"):
        check_build_dockerfiles(doc, load_build_context(link, keep_paths=keep))
    check_build_dockerfiles(doc, None)
