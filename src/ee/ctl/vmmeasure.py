"""`eectl vm measure NAME|--image DIR`: the vTPM's quoted PCR4/PCR9 of a measurement-mode
boot next to `eectl trust measure`'s prediction (see :mod:`ee.vm.measure`)."""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path

import trio

from ee.ctl._table import table
from ee.vm.domain import Accel, domain_xml
from ee.vm.errors import VmError
from ee.vm.host import VmHost
from ee.vm.manage import create_vm, delete_vm
from ee.vm.measure import (
    SWTPM_LOCALCA,
    Booted,
    MeasureFailed,
    booted_from_xml,
    compare,
    ek_roots,
    predict_booted,
    verify,
    wait_evidence,
)
from ee.vm.plan import CreateRequest, WorkDir
from ee.vm.sizes import resolve_size

__all__ = ["measure_command"]

MEASUREMENT_FLAG = "easyenclave.measurement=1"


def _new_vm(args: argparse.Namespace, host: VmHost, root: Path, accel: Accel) -> tuple[
        str, Booted, WorkDir]:
    size = resolve_size(args.size, dict(os.environ), memory_gib=args.memory,
                        vcpus=args.vcpus, disk_gib="0")
    req = CreateRequest(name=f"ee-measure-{secrets.token_hex(3)}",
                        image=Path(args.image).resolve(), size=size, root_dir=root,
                        measure=True, tpm=True, accel=accel, created=int(time.time()))
    plan = create_vm(req, host)
    print(f"measure: booting {req.name} ({size.memory_gib:g} GiB, {size.vcpus} vCPU, "
          f"{accel}, OVMF + vTPM) from {req.image}", flush=True)
    return req.name, booted_from_xml(domain_xml(plan.spec)), plan.workdir


def _existing_vm(name: str, host: VmHost, root: Path) -> tuple[Booted, WorkDir]:
    info = host.info(name)
    if info is None:
        raise VmError(f"no VM named {name}")
    work = WorkDir(Path(info.labels.workdir))
    if work.path.resolve() != (root / name).resolve():
        raise VmError(f"{name}'s work dir {work.path} is not under {root} (--root)")
    try:
        booted = booted_from_xml((work.path / "domain.xml").read_text())
    except OSError as exc:
        raise VmError(f"cannot read {name}'s domain: {exc}") from None
    if MEASUREMENT_FLAG not in booted.cmdline.split() or not work.nonce.is_file():
        raise VmError(f"{name} was not created in measurement mode "
                      f"(eectl vm create {name} --measure --tpm ...)")
    return booted, work


def measure_command(args: argparse.Namespace, root: Path, accel: Accel) -> int:
    made: str | None = None
    with VmHost(args.connect) as host:
        try:
            if args.image is not None:
                made, booted, work = _new_vm(args, host, root, accel)
                name = made
            else:
                name = args.name
                booted, work = _existing_vm(name, host, root)
            nonce = bytes.fromhex(work.nonce.read_text().strip())

            def alive() -> bool:
                info = host.info(name)
                return info is not None and info.state == "running"

            started = time.monotonic()
            blob = trio.run(lambda: wait_evidence(work.serial, alive, timeout_s=args.timeout))
            # read only now: libvirt's swtpm_localca makes its CA for the first vTPM
            roots = ek_roots([Path(p) for p in args.ek_ca] or list(SWTPM_LOCALCA))
            result = verify(blob, nonce, roots, now=time.time())
            prediction = predict_booted(booted)
        except MeasureFailed as exc:
            raise VmError(str(exc)) from None
        finally:
            if made is not None and not args.keep:
                delete_vm(made, host, root)
    print(f"measure: {name}: quote verified after {time.monotonic() - started:.0f}s (EK "
          f"certificate under {', '.join(args.ek_ca) or SWTPM_LOCALCA[0].parent}, AK "
          f"signature, nonce, PCR digest, event log of {result.event_count} events)")
    print(f"predicted as `eectl trust measure` does for the booted kernel, initrd, "
          f"{len(booted.cmdline.encode())}-byte cmdline and {booted.memory_mib} MiB")
    rows = compare(result.pcrs, prediction)
    print(table(("REGISTER", "VM (QUOTED)", "EECTL TRUST MEASURE (PREDICTED)", ""),
                [(r.register, r.quoted, r.predicted, "ok" if r.ok else "MISMATCH")
                 for r in rows]))
    bad = [r.register for r in rows if not r.ok]
    if bad:
        print(f"eectl vm measure: {', '.join(bad)} differ from the prediction")
        return 1
    return 0
