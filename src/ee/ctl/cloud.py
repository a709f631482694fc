"""``eectl image publish-gcp FILE --project P --bucket B``: upload a baked disk to Cloud
Storage and create the GCP image (``ee.cloud.publish``), idempotent by content digest.

Credentials: ``$GOOGLE_APPLICATION_CREDENTIALS`` (a service-account key file).
``$EE_GCP_STORAGE_URL`` / ``$EE_GCP_COMPUTE_URL`` replace the API endpoints (https, or
http to loopback: a private endpoint or a test stand-in). Exit: 0 published (or already
there), 1 the cloud refused or failed, 2 usage or credentials.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from ee.cloud.gcp import GcpConfigError, GcpError, client_from_env
from ee.cloud.publish import publish, read_bake_info

__all__ = ["register_cloud_commands"]


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


def register_cloud_commands(sub: Any) -> None:
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
