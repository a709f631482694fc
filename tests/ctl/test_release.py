"""`eectl release build|sign|verify|keygen`: the manifest, SHA256SUMS and signature, on
the real project (built twice from one commit) and on hand-made release directories."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from ee.ctl import release
from ee.ctl.release import FileFacts, check_release, make_manifest, sums_text
from ee.protocol.canonical import canonical_json

ROOT = Path(__file__).resolve().parents[2]
HAS_BUILD = importlib.util.find_spec("build") is not None
needs_build = pytest.mark.skipif(
    not HAS_BUILD, reason="needs the 'build' package (pip install build)")


def eectl(*argv: str) -> int:
    """Run an `eectl release ...` command line through the module's own parser."""
    parser = argparse.ArgumentParser(prog="eectl")
    release.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["release", *argv])
    return int(args.handler(args))


def hand_made(tmp: Path, files: dict[str, bytes], image: dict[str, object] | None = None
              ) -> Path:
    """A release directory as `build` lays it out, from given artefact bytes."""
    out = tmp / "rel"
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    facts = release.scan(out)
    manifest = make_manifest(name="easyenclave", version="1.0", commit="c0ffee",
                             source_date_epoch=1, artifacts=facts, image=image)
    (out / "manifest.json").write_bytes(canonical_json(manifest) + b"\n")
    (out / "SHA256SUMS").write_text(sums_text(facts))
    return out


@pytest.fixture
def keys(tmp_path: Path) -> tuple[str, str]:
    assert eectl("keygen", "--out", str(tmp_path / "release")) == 0
    return str(tmp_path / "release.key"), str(tmp_path / "release.pub")


# --- pure checks ---------------------------------------------------------------------


def test_check_release_names_every_difference() -> None:
    listed = {"dist/a.whl": FileFacts("a" * 64, 3), "dist/b.tar.gz": FileFacts("b" * 64, 4)}
    manifest = make_manifest(name="n", version="1", commit="c", source_date_epoch=0,
                             artifacts=listed, image=None)
    sums = sums_text(listed)
    assert check_release(manifest, sums, listed) == []
    found = {"dist/a.whl": FileFacts("a" * 64, 5), "dist/c": FileFacts("c" * 64, 1)}
    bad_sums = sums.replace("b" * 64, "d" * 64) + "e" * 64 + "  dist/x\nnonsense\n"
    problems = check_release(manifest, bad_sums, found, commit="other")
    assert problems == [
        "manifest.json: git_commit is 'c', expected 'other'",
        "dist/a.whl: size 5, manifest says 3",
        "dist/b.tar.gz: missing",
        "dist/c: present but not in the manifest",
        "SHA256SUMS line 4: not '<sha256>  <path>'",
        f"SHA256SUMS: dist/b.tar.gz is {'d' * 64}, manifest says {'b' * 64}",
        "SHA256SUMS: lists dist/x, which the manifest does not",
    ]
    assert check_release(manifest, None, listed) == ["SHA256SUMS: missing"]


@pytest.mark.parametrize("path", [
    "dist/../../etc/passwd", "/dist/a", "dist", "other/a", "dist//a", "dist/./a",
    "dist\\a", "image/..", ""])
def test_artifact_paths_outside_the_release_are_refused(path: str) -> None:
    assert not release.safe_artifact_path(path)
    manifest = {"schema": release.SCHEMA, "name": "n", "version": "1", "git_commit": "c",
                "artifacts": {path: {"sha256": "0" * 64, "size": 0}}}
    problems = check_release(manifest, "", {})
    assert any("is not under dist/ or image/" in p for p in problems), problems


def test_manifest_differences_names_keys_and_artifacts() -> None:
    a = make_manifest(name="n", version="1", commit="c", source_date_epoch=0,
                      artifacts={"dist/a": FileFacts("a" * 64, 1)}, image=None)
    b = {**a, "git_commit": "d", "artifacts": {"dist/a": {"sha256": "b" * 64, "size": 1}}}
    diff = release.manifest_differences(a, b)
    assert diff[0].startswith("artifacts[dist/a]: ") and diff[1] == "git_commit: 'c' != 'd'"
    assert release.manifest_differences(a, dict(a)) == []


# --- sign / verify on a release directory --------------------------------------------


def test_sign_then_verify_and_every_tamper_is_named(
        tmp_path: Path, keys: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    private, public = keys
    out = hand_made(tmp_path, {"dist/pkg.whl": b"wheel", "dist/pkg.tar.gz": b"sdist"})
    assert eectl("verify", str(out), "--pubkey", public) == 1
    assert "signature: " in capsys.readouterr().err  # not signed yet
    assert eectl("sign", str(out), "--key", private) == 0
    assert eectl("verify", str(out), "--pubkey", public) == 0
    assert eectl("verify", str(out), "--pubkey", public, "--commit", "c0ffee") == 0
    capsys.readouterr()

    # Another key: the signature does not verify.
    assert eectl("keygen", "--out", str(tmp_path / "other")) == 0
    assert eectl("verify", str(out), "--pubkey", str(tmp_path / "other.pub")) == 1
    assert "signature: " in capsys.readouterr().err

    # An artefact swapped (same size), and SHA256SUMS rewritten to match it.
    whl = out / "dist/pkg.whl"
    whl.write_bytes(b"WHEEL")
    new = release.file_facts(whl).sha256
    sums = (out / "SHA256SUMS").read_text()
    (out / "SHA256SUMS").write_text(
        "\n".join(f"{new}  dist/pkg.whl" if line.endswith("dist/pkg.whl") else line
                  for line in sums.splitlines()) + "\n")
    assert eectl("verify", str(out), "--pubkey", public) == 1
    err = capsys.readouterr().err
    assert f"dist/pkg.whl: sha256 {new}, manifest says" in err
    assert "SHA256SUMS: dist/pkg.whl is" in err

    # The manifest edited to match the swapped file: the signature no longer holds.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"]["dist/pkg.whl"]["sha256"] = new
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert eectl("verify", str(out), "--pubkey", public) == 1
    err = capsys.readouterr().err
    assert "signature: " in err and "bad signature" in err
    assert "dist/pkg.whl: sha256" not in err  # the files now match the (forged) manifest


def test_unlisted_file_and_symlink_are_named(tmp_path: Path, keys: tuple[str, str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    private, public = keys
    out = hand_made(tmp_path, {"dist/pkg.whl": b"wheel"})
    assert eectl("sign", str(out), "--key", private) == 0
    (out / "dist/extra.whl").write_bytes(b"x")
    (out / "image").mkdir()
    (out / "image/link").symlink_to("/etc/passwd")
    assert eectl("verify", str(out), "--pubkey", public) == 1
    err = capsys.readouterr().err
    assert "dist/extra.whl: present but not in the manifest" in err
    assert "image/link: present but not in the manifest" in err


def test_sign_refuses_a_directory_that_does_not_match(tmp_path: Path, keys: tuple[str, str],
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    private, _ = keys
    out = hand_made(tmp_path, {"dist/pkg.whl": b"wheel"})
    (out / "dist/pkg.whl").write_bytes(b"other")
    assert eectl("sign", str(out), "--key", private) == 1
    assert "refusing to sign: dist/pkg.whl: sha256 " in capsys.readouterr().err
    assert not (out / "manifest.json.sig").exists()


def test_sign_with_key_from_environment(tmp_path: Path, keys: tuple[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    private, public = keys
    out = hand_made(tmp_path, {"dist/pkg.whl": b"wheel"})
    monkeypatch.setenv("EE_RELEASE_KEY", Path(private).read_text())
    assert eectl("sign", str(out), "--key-env", "EE_RELEASE_KEY") == 0
    assert eectl("verify", str(out), "--pubkey", public) == 0
    monkeypatch.setenv("EE_RELEASE_KEY", "not a key")
    assert eectl("sign", str(out), "--key-env", "EE_RELEASE_KEY") == 2


def test_keygen_refuses_to_overwrite(tmp_path: Path, keys: tuple[str, str]) -> None:
    before = Path(keys[0]).read_bytes()
    assert eectl("keygen", "--out", str(tmp_path / "release")) == 2
    assert Path(keys[0]).read_bytes() == before
    assert Path(keys[0]).stat().st_mode & 0o777 == 0o600


# --- the real build --------------------------------------------------------------------


def _image(tmp: Path) -> Path:
    image = tmp / "image-in"
    image.mkdir()
    artifacts = {}
    for name, data in (("vmlinuz", b"kernel"), ("root.img", b"squashfs+verity")):
        (image / name).write_bytes(data)
        facts = release.file_facts(image / name)
        artifacts[name] = {"sha256": facts.sha256, "size": facts.size}
    (image / "manifest.json").write_text(json.dumps(
        {"root_hash": "ab" * 32, "artifacts": artifacts, "source_date_epoch": 7}))
    (image / "measurements.json").write_text(json.dumps({"mrtd": "00" * 48}))
    return image


@needs_build
def test_two_builds_of_one_commit_are_identical_and_verify(
        tmp_path: Path, keys: tuple[str, str]) -> None:
    private, public = keys
    first, second = tmp_path / "first", tmp_path / "second"
    m1 = release.build_release(first, source=ROOT)
    m2 = release.build_release(second, source=ROOT, image=_image(tmp_path))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert m1["git_commit"] == head and m1["image"] is None
    names = {Path(p).name for p in m1["artifacts"]}
    assert any(n.endswith(".whl") for n in names) and any(n.endswith(".tar.gz") for n in names)
    # Byte-identical wheel and sdist; the second build only adds the image.
    for path, facts in m1["artifacts"].items():
        assert m2["artifacts"][path] == facts, path
        assert (first / path).read_bytes() == (second / path).read_bytes()
    assert m2["image"] == {"root_hash": "ab" * 32, "measurements": {"mrtd": "00" * 48},
                           "source_date_epoch": 7}
    assert {"image/vmlinuz", "image/root.img", "image/manifest.json"} <= set(m2["artifacts"])
    assert release.manifest_differences(m1, {**m2, "artifacts": m1["artifacts"],
                                             "image": None}) == []
    for out in (first, second):
        assert eectl("sign", str(out), "--key", private) == 0
        assert eectl("verify", str(out), "--pubkey", public, "--commit", head) == 0
        subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, check=True)


@needs_build
def test_build_refuses_a_used_directory_and_a_bad_image(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "stale").write_text("x")
    assert eectl("build", "--out", str(used), "--source", str(ROOT)) == 2
    image = _image(tmp_path)
    (image / "vmlinuz").write_bytes(b"other kernel")
    assert eectl("build", "--out", str(tmp_path / "o"), "--source", str(ROOT),
                 "--image", str(image)) == 1


def test_verify_against_the_keys_a_bundle_pins(
        tmp_path: Path, keys: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """--bundle: the release must be signed by a key the (verified) bundle pins."""
    from ee.ctl import cpbundle

    def eectl_cp(*argv: str) -> int:
        parser = argparse.ArgumentParser(prog="eectl")
        cpbundle.register(parser.add_subparsers(dest="group", required=True))
        args = parser.parse_args(["cp", *argv])
        return int(args.handler(args))

    private, public = keys
    out = hand_made(tmp_path, {"dist/pkg.whl": b"wheel"})
    assert eectl("sign", str(out), "--key", private) == 0
    assert eectl_cp("bundle", "keygen", "--out", str(tmp_path / "offline")) == 0
    assert eectl("keygen", "--out", str(tmp_path / "other")) == 0
    for name, pinned in (("pins-ours", public), ("pins-other", str(tmp_path / "other.pub"))):
        assert eectl_cp("bundle", "create", "--signing-key", str(tmp_path / "offline.key"),
                        "--out", str(tmp_path / name), "--cluster-id", "c",
                        "--release-pubkey", pinned) == 0
    capsys.readouterr()
    offline = str(tmp_path / "offline.pub")
    assert eectl("verify", str(out), "--bundle", str(tmp_path / "pins-ours"),
                 "--bundle-pubkey", offline) == 0
    assert eectl("verify", str(out), "--bundle", str(tmp_path / "pins-other"),
                 "--bundle-pubkey", offline) == 1
    assert "signature: " in capsys.readouterr().err
    # The bundle itself must verify under its signer before its pins count.
    assert eectl("verify", str(out), "--bundle", str(tmp_path / "pins-ours"),
                 "--bundle-pubkey", public) == 2
    assert "bootstrap bundle refused" in capsys.readouterr().err
    assert eectl("verify", str(out), "--bundle", str(tmp_path / "pins-ours")) == 2
