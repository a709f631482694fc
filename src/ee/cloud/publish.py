"""Publishing a baked disk (``eectl image bake-gcp``) as a GCP image, idempotently.

The content digest (sha256 of the ``.tar.gz``) names everything: the object
``easyenclave/NAME-DIGEST16.tar.gz`` and the image ``NAME-DIGEST16``; the full digest is
in the image's description and the object's metadata. A second publish of the same file
finds the image (same digest: nothing to do), or finds the object (same size, md5 and
digest: no upload) and only creates the image. An image of that name with another
digest is a conflict, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import attrs
import trio

from ee.cloud.gcp import GcpClient, GcpConfigError, GcpError, valid_resource_name

__all__ = ["GUEST_OS_FEATURES", "PublishResult", "image_body", "publish", "read_bake_info"]

#: what a TDX confidential VM booting our UKI from an NVMe disk with gVNIC needs
GUEST_OS_FEATURES = ("UEFI_COMPATIBLE", "TDX_CAPABLE", "GVNIC")
DIGEST_LEN = 16


@attrs.frozen
class PublishResult:
    image: str
    object: str
    uploaded: bool
    created: bool
    self_link: str | None


def read_bake_info(tarball: Path) -> dict[str, Any]:
    """``FILE.tar.gz.json`` of a bake, checked against the file's sha256."""
    meta = Path(f"{tarball}.json")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise GcpConfigError(f"{meta}: unreadable ({exc}); bake with `eectl image bake-gcp`"
                             ) from None
    if not isinstance(info, dict) or not all(
            isinstance(info.get(k), str) for k in ("name", "family", "tar_sha256", "root_hash")):
        raise GcpConfigError(f"{meta}: not a bake record")
    digest = hashlib.sha256()
    with tarball.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != info["tar_sha256"]:
        raise GcpConfigError(f"{tarball} does not match {meta} (tar_sha256)")
    if not valid_resource_name(info["name"], 40) or not valid_resource_name(info["family"]):
        raise GcpConfigError(f"{meta}: bad image name or family")
    return info


def names(info: dict[str, Any]) -> tuple[str, str]:
    """(image name, object name) for a bake."""
    image = f"{info['name']}-{info['tar_sha256'][:DIGEST_LEN]}"
    return image, f"easyenclave/{image}.tar.gz"


def image_body(info: dict[str, Any], bucket: str, object_name: str) -> dict[str, Any]:
    """The ``images.insert`` request for a bake stored as gs://bucket/object_name."""
    image, _ = names(info)
    return {
        "name": image,
        "family": info["family"],
        "description": f"EasyEnclave agent disk sha256:{info['tar_sha256']} "
                       f"root_hash:{info['root_hash']}",
        "rawDisk": {"source": f"https://storage.googleapis.com/{bucket}/{object_name}"},
        "guestOsFeatures": [{"type": t} for t in GUEST_OS_FEATURES],
        "architecture": "X86_64",
        "labels": {"easyenclave": "agent-image",
                   "ee-digest": info["tar_sha256"][:DIGEST_LEN]},
    }


async def publish(client: GcpClient, project: str, bucket: str, tarball: Path,
                  info: dict[str, Any]) -> PublishResult:
    image, object_name = names(info)
    digest = info["tar_sha256"]
    existing = await client.get_image(project, image)
    if existing is not None:
        if digest not in str(existing.get("description", "")):
            raise GcpError(f"image {image} exists with another content digest; not replaced")
        return PublishResult(image, object_name, False, False, existing.get("selfLink"))
    uploaded = False
    size = (await trio.Path(tarball).stat()).st_size
    stored = await client.get_object(bucket, object_name)
    meta = (stored or {}).get("metadata") or {}
    if stored is None or meta.get("ee-sha256") != digest or \
            str(stored.get("size")) != str(size):
        await client.upload(bucket, object_name, tarball, {"ee-sha256": digest})
        uploaded = True
    await client.insert_image(project, image_body(info, bucket, object_name))
    created = await client.get_image(project, image)
    return PublishResult(image, object_name, uploaded, True,
                         created.get("selfLink") if created else None)
