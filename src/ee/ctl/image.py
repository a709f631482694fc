"""``eectl image build``: build the measured VM image from this checkout.

``eectl image build --out DIR [--profile agent] [--cache DIR]`` writes ``DIR/vmlinuz``,
``DIR/initrd.img``, ``DIR/root.img`` (squashfs with its dm-verity tree appended),
``DIR/cmdline`` and ``DIR/manifest.json``. ``eectl image bake-gcp --image DIR --out
FILE.tar.gz`` packs such a build as a GCP disk image (`ee.image.disk`);
``eectl image publish-gcp FILE --project P --bucket B`` uploads it and creates the image
(`ee.cloud.publish`; credentials from ``$GOOGLE_APPLICATION_CREDENTIALS``;
``$EE_GCP_STORAGE_URL``/``$EE_GCP_COMPUTE_URL`` replace the endpoints: https, or http to
loopback; exit 1 when the cloud refuses, 2 on usage or credentials). :func:`reproducibility_check`
is the body of ``eectl trust reproducibility-check``. Exit: 0 built, 1 the build failed,
2 usage or a missing host tool.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio

from ee.cloud.gcp import GcpConfigError, GcpError, client_from_env, valid_resource_name
from ee.cloud.publish import publish, read_bake_info
from ee.image.build import (
    BuildOptions,
    Progress,
    build_image,
    default_cache_dir,
)
from ee.image.build import (
    reproducibility_check as _check,
)
from ee.image.errors import ImageError, ProfileError, ToolMissing
from ee.image.profile import load_profile

__all__ = ["register", "register_trust_commands", "reproducibility_check"]


def _fail(message: str, code: int) -> int:
    print(f"eectl: {message}", file=sys.stderr)
    return code


def _build(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile)
        result = build_image(profile, BuildOptions(
            out=Path(args.out), cache=Path(args.cache) if args.cache else default_cache_dir()))
    except (ToolMissing, ProfileError) as exc:
        return _fail(str(exc), 2)
    except ImageError as exc:
        return _fail(str(exc), 1)
    m = result.manifest
    size = sum(a.size for a in m.artefacts)
    print(f"built {m.profile} image in {args.out}: root_hash {m.root_hash}, "
          f"{size / 2**20:.0f} MiB, {sum(result.timings.values()):.0f}s")
    return 0


def _bake_gcp(args: argparse.Namespace) -> int:
    from ee.image.disk import bake_gcp

    try:
        result = bake_gcp(Path(args.image), Path(args.out), name=args.name, family=args.family)
    except ToolMissing as exc:
        return _fail(str(exc), 2)
    except ImageError as exc:
        return _fail(str(exc), 1)
    info = result.info
    print(f"baked {args.out} ({info['tar_size'] / 2**20:.0f} MiB; disk.raw "
          f"{result.disk_size / 2**30:.0f} GiB): image {info['name']} family {info['family']}, "
          f"root_hash {info['root_hash']}, sha256 {info['tar_sha256']}")
    return 0


def reproducibility_check(profile: str = "agent", work: str | None = None) -> int:
    """Build twice from scratch and compare; 0 identical, 1 different, 2 cannot run."""
    try:
        loaded = load_profile(profile)
        if work is not None:
            return _check(loaded, Path(work), progress=Progress())
        with tempfile.TemporaryDirectory(prefix="ee-repro-") as tmp:
            return _check(loaded, Path(tmp), progress=Progress())
    except (ToolMissing, ProfileError) as exc:
        return _fail(str(exc), 2)
    except ImageError as exc:
        return _fail(str(exc), 1)


def _repro(args: argparse.Namespace) -> int:
    return reproducibility_check(args.profile, args.work)


def register_trust_commands(trust: Any) -> None:
    """Add ``reproducibility-check`` to the ``eectl trust`` subparsers."""
    p = trust.add_parser(
        "reproducibility-check",
        help="build the image twice from scratch; exit 0 only when both are identical")
    p.add_argument("--profile", default="agent")
    p.add_argument("--work", metavar="DIR", help="keep both builds here (default: a temp dir)")
    p.set_defaults(handler=_repro)


async def _publish(args: argparse.Namespace) -> int:
    tarball = Path(args.file)
    info = await trio.to_thread.run_sync(read_bake_info, tarball)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=20)) as http:
        client = client_from_env(http)
        result = await publish(client, args.project, args.bucket, tarball, info)
    what = ("published" if result.created else "already published")
    print(f"{what}: image {result.image} (family {info['family']}) in project "
          f"{args.project}; gs://{args.bucket}/{result.object} "
          f"{'uploaded' if result.uploaded else 'already stored'}")
    if result.self_link:
        print(f"selfLink: {result.self_link}")
    return 0


def _publish_cmd(args: argparse.Namespace) -> int:
    try:
        return trio.run(_publish, args)
    except GcpConfigError as exc:
        print(f"eectl image publish-gcp: {exc}", file=sys.stderr)
        return 2
    except (GcpError, httpx.HTTPError, OSError) as exc:
        print(f"eectl image publish-gcp: {exc}", file=sys.stderr)
        return 1


def _register_publish_gcp(sub: Any) -> None:
    """Add ``publish-gcp`` to the ``eectl image`` subcommands."""
    p = sub.add_parser(
        "publish-gcp", help="upload a baked disk and create the GCP image (idempotent)",
        description="Upload FILE (from `eectl image bake-gcp`) to gs://BUCKET by a resumable "
        "upload and create the Compute image NAME-DIGEST (family from the bake) with the "
        "guest OS features UEFI_COMPATIBLE, TDX_CAPABLE, GVNIC. Credentials from "
        "$GOOGLE_APPLICATION_CREDENTIALS. Publishing the same file again changes nothing.")
    p.add_argument("file", metavar="FILE.tar.gz")
    p.add_argument("--project", required=True)
    p.add_argument("--bucket", required=True)
    p.set_defaults(handler=_publish_cmd)


def _gcp_name(value: str) -> str:
    if not valid_resource_name(value, max_len=40):
        raise argparse.ArgumentTypeError(
            f"{value!r}: lower-case letters, digits and '-', starting with a letter, "
            "at most 40 characters")
    return value


def register(subparsers: Any) -> None:
    group = subparsers.add_parser("image", help="build the measured VM image")
    sub = group.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    p = sub.add_parser("build", help="build vmlinuz, initrd.img, root.img, cmdline, manifest")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--profile", default="agent", help="image/profiles/NAME.json (default agent)")
    p.add_argument("--cache", metavar="DIR",
                   help="debootstrap and wheel cache (default ~/.cache/easyenclave/image)")
    p.set_defaults(handler=_build)
    p = sub.add_parser(
        "bake-gcp", help="a GCP-importable UEFI disk (ESP + UKI + dm-verity root) as .tar.gz",
        description="Pack a built image (DIR from `eectl image build`) as disk.raw (GPT: ESP "
        "with a unified kernel image, the squashfs root, its verity hash tree) alone in a "
        "gzip'd GNU tar, as GCP images.insert imports it; FILE.json beside it records the "
        "digests. Byte-reproducible.")
    p.add_argument("--image", required=True, metavar="DIR", help="a built image directory")
    p.add_argument("--out", required=True, metavar="FILE.tar.gz")
    p.add_argument("--name", default="easyenclave-agent", type=_gcp_name,
                   help="GCP image name (default easyenclave-agent; publish-gcp appends the "
                   "content digest)")
    p.add_argument("--family", default="easyenclave-agent", type=_gcp_name,
                   help="GCP image family (default easyenclave-agent)")
    p.set_defaults(handler=_bake_gcp)
    _register_publish_gcp(sub)


def main(argv: list[str] | None = None) -> int:
    """Run the ``image`` group (and ``reproducibility-check``) without ``eectl``'s GROUPS."""
    parser = argparse.ArgumentParser(prog="eectl")
    groups = parser.add_subparsers(dest="group", required=True)
    register(groups)
    trust = groups.add_parser("trust").add_subparsers(dest="trust_command", required=True)
    register_trust_commands(trust)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
