#!/bin/sh
# Build the control plane's container image (minbase bookworm + python3 + this checkout's
# ee package), cached by input hash, and push it to the loopback registry
# (Debian's docker-registry on 127.0.0.1:5000; no Docker Hub needed).
#
# Prints two lines: the host's name (127.0.0.1:5000/ee-cp@sha256:...) and the name a VM
# under QEMU user networking pulls (10.0.2.2:5000/ee-cp@sha256:...), so
#   REF=$(tools/images/build_cp_image.sh | tail -1)
#   eectl cp bootstrap cp-1 ... --control-plane-image "$REF"
# Needs: docker (daemon running), debootstrap, the registry (tools/vm/services or
# `docker-registry` started on 127.0.0.1:5000). Options: --cache DIR, --no-push.
set -eu
HERE="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="${PYTHONPATH:-$HERE/src}"
exec python3 -m ee.vm.cpimage "$@"
