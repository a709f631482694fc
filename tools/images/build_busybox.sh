#!/bin/sh
# Build the tiny local base image `ee-busybox:local` from the host's busybox-static.
#
# No image registry is needed: the rootfs is /bin/busybox plus its applet symlinks,
# imported with `docker import`. Idempotent: does nothing when the image exists
# (pass --force to rebuild). Needs: docker (daemon running), busybox-static.
set -eu

IMAGE="${EE_BUSYBOX_IMAGE:-ee-busybox:local}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

if [ "$FORCE" -eq 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "$IMAGE already present"
    exit 0
fi

BUSYBOX="$(command -v busybox || true)"
if [ -z "$BUSYBOX" ]; then
    echo "busybox not found: apt-get install -y busybox-static" >&2
    exit 1
fi
if ! file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' \
    && ldd "$BUSYBOX" >/dev/null 2>&1; then
    echo "$BUSYBOX is dynamically linked: apt-get install -y busybox-static" >&2
    exit 1
fi

ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p "$ROOTFS/bin" "$ROOTFS/sbin" "$ROOTFS/usr/bin" "$ROOTFS/usr/sbin" \
    "$ROOTFS/tmp" "$ROOTFS/etc" "$ROOTFS/var/www" "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev"
chmod 1777 "$ROOTFS/tmp"
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
chmod 0755 "$ROOTFS/bin/busybox"
# Applet symlinks (sh, httpd, nc, ...), created by busybox itself inside the rootfs.
chroot "$ROOTFS" /bin/busybox --install -s 2>/dev/null || {
    for applet in $("$BUSYBOX" --list-full); do
        [ -e "$ROOTFS/$applet" ] || ln -s /bin/busybox "$ROOTFS/$applet"
    done
}
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOTFS/etc/passwd"
echo 'root:x:0:' >"$ROOTFS/etc/group"

tar -C "$ROOTFS" -c . | docker import \
    --change 'CMD ["/bin/sh"]' \
    --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$IMAGE" >/dev/null
echo "built $IMAGE"
