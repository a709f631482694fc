"""The guide reader itself: blocks with their expected output, and the matcher."""

from __future__ import annotations

from .guidekit import blocks, split_output, unmatched

DOC = """Intro.

```sh
echo one
```

```text
o…e
```

Prose, then a block with no expected output:

```sh
echo two
```

Prose between a block and its text breaks the pairing:

```text
ignored
```
"""


def test_blocks_pair_commands_with_the_text_right_after_them() -> None:
    found = blocks(DOC)
    assert [(b.index, b.command, b.expected, b.line) for b in found] == [
        (0, "echo one\n", ("o…e",), 3), (1, "echo two\n", (), 13)]


def test_unmatched_is_in_order_with_ellipsis() -> None:
    assert unmatched(("a…", "c"), ["x", "abc", "c"]) is None
    assert unmatched(("c", "a…"), ["abc", "c"]) == "a…"
    assert unmatched(("sha256:…",), ["sha256:"]) is None
    assert unmatched(("true",), ["true false"]) == "true"


def test_split_output_by_marker() -> None:
    out = "@@ee-guide-block 0\nx\n@@ee-guide-block 1\n@@ee-guide-block 2\ny\nz\n"
    assert split_output(out) == {0: ["x"], 1: [], 2: ["y", "z"]}
