"""`eectl vm`'s pure parts: sizes, the domain XML (checked by libvirt's own schema),
the config delivery choice, the dev CP URL rewrite, orphan finding."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ee.agent.config import CMDLINE_CONFIGZ, CMDLINE_LIMIT, resolve_config
from ee.vm.domain import METADATA_NS, DomainSpec, Labels, domain_xml, labels_from_xml
from ee.vm.errors import VmRefused
from ee.vm.host import DomainInfo
from ee.vm.manage import find_orphans
from ee.vm.plan import CreateRequest, guest_cp_url, plan_vm
from ee.vm.sizes import PRESETS, SizeError, VmSize, resolve_size

IMAGE_CMDLINE = ("console=ttyS0 panic=1 ee.root=/dev/vda ee.verity.roothash=" + "a" * 64
                 + " ee.verity.salt=" + "b" * 64 + " ee.verity.data_blocks=1 "
                 "ee.verity.hash_start=1")
MRTD = "ab" * 48


def validate(xml: str, tmp_path: Path) -> None:
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate missing (apt-get install libvirt-clients)")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    done = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr + xml


def request(tmp_path: Path, **kw: object) -> CreateRequest:
    args: dict[str, object] = {
        "name": "vm-1", "image": tmp_path / "image", "size": PRESETS["tiny"],
        "root_dir": tmp_path / "vms", "cp": "ws://127.0.0.1:9001", "dev": True}
    args.update(kw)
    return CreateRequest(**args)  # type: ignore[arg-type]


def test_size_presets_env_and_flags() -> None:
    assert PRESETS["tiny"] == VmSize("tiny", 4, 4, 0)
    assert PRESETS["standard"] == VmSize("standard", 16, 16, 0)
    assert PRESETS["llm"] == VmSize("llm", 16, 8, 80)
    env = {"EE_VM_TINY_MEMORY_GIB": "2", "EE_VM_TINY_VCPUS": "1", "EE_VM_LLM_DISK_GIB": "5"}
    assert resolve_size("tiny", env) == VmSize("tiny", 2, 1, 0)
    assert resolve_size("tiny", env, memory_gib="1.5", disk_gib="4") == VmSize("tiny", 1.5, 1, 4)
    assert resolve_size("llm", env).disk_gib == 5
    assert resolve_size("tiny", {}, memory_gib="1.5").memory_mib == 1536
    for bad in ({"memory_gib": "0"}, {"vcpus": "1.5"}, {"vcpus": "0"}, {"disk_gib": "-1"},
                {"memory_gib": "nan"}, {"memory_gib": "lots"}):
        with pytest.raises(SizeError):
            resolve_size("tiny", {}, **bad)
    with pytest.raises(SizeError, match="unknown size 'huge'"):
        resolve_size("huge", {})
    with pytest.raises(SizeError, match="EE_VM_TINY_VCPUS"):
        resolve_size("tiny", {"EE_VM_TINY_VCPUS": "x"})


def test_dev_cp_url_is_rewritten_to_the_host_as_the_guest_sees_it() -> None:
    assert guest_cp_url("ws://127.0.0.1:9001", dev=True) == \
        "ws://10.0.2.2:9001/api/v2/agents/connect"
    assert guest_cp_url("ws://localhost:9/x", dev=True) == "ws://10.0.2.2:9/x"
    assert guest_cp_url("wss://cp.example:443", dev=False) == \
        "wss://cp.example:443/api/v2/agents/connect"
    with pytest.raises(VmRefused, match="add --dev"):
        guest_cp_url("ws://127.0.0.1:9001", dev=False)
    with pytest.raises(VmRefused, match="ws:// or wss://"):
        guest_cp_url("http://cp:80", dev=False)


def test_domain_xml_validates_and_carries_what_the_vm_needs(tmp_path: Path) -> None:
    plan = plan_vm(request(tmp_path, size=VmSize("tiny", 1, 1, 4), tpm=True),
                   image_cmdline=IMAGE_CMDLINE, agent_port=4242)
    xml = domain_xml(plan.spec)
    validate(xml, tmp_path)
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"  # TCG
    assert root.findtext("memory") == "1024" and root.findtext("vcpu") == "1"
    assert root.findtext("os/kernel") == str(tmp_path / "vms/vm-1/vmlinuz")
    cmdline = root.findtext("os/cmdline") or ""
    assert cmdline.startswith(IMAGE_CMDLINE) and f"{CMDLINE_CONFIGZ}=" in cmdline
    disks = [(d.find("target").get("dev"), d.find("source").get("file"),  # type: ignore[union-attr]
              d.find("readonly") is not None) for d in root.iter("disk")]
    assert disks == [("vda", str(tmp_path / "image/root.img"), True),
                     ("vdb", str(tmp_path / "vms/vm-1/data.qcow2"), False)]
    assert root.find("devices/tpm").get("model") == "tpm-crb"  # type: ignore[union-attr]
    assert root.find("os/loader").get("type") == "pflash"  # type: ignore[union-attr]
    assert root.findtext("on_reboot") == "destroy" and root.find("features/acpi") is not None
    entry = root.find("sysinfo[@type='fwcfg']/entry")
    assert entry is not None and entry.get("name") == "opt/easyenclave/sim-td.json"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert "user,id=ee0,hostfwd=tcp:127.0.0.1:4242-:8080" in args  # loopback only
    meta = root.find(f"metadata/{{{METADATA_NS}}}vm")
    assert meta is not None and meta.get("size") == "tiny" and meta.get("role") == "agent"
    assert labels_from_xml(xml) == plan.spec.labels
    assert plan.spec.labels.agent_port == 4242
    assert labels_from_xml("<domain type='qemu'><name>x</name></domain>") is None


def test_kvm_and_tdx_xml(tmp_path: Path) -> None:
    plan = plan_vm(request(tmp_path, accel="kvm", tdx=True, dev=False,
                           cp="wss://cp.example"), image_cmdline=IMAGE_CMDLINE,
                   agent_port=None)
    root = ET.fromstring(domain_xml(plan.spec))
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    sec = root.find("launchSecurity")
    assert sec is not None and sec.get("type") == "tdx"
    assert sec.find("quoteGenerationService").get("path") == "/var/run/tdx-qgs/qgs.socket"  # type: ignore[union-attr]
    assert root.find("os/loader").get("type") == "rom"  # type: ignore[union-attr]
    assert plan.config.attestation_provider == "tsm"
    # a plain KVM domain validates against libvirt 9's schema (TDX needs libvirt >= 11)
    validate(domain_xml(plan_vm(request(tmp_path, accel="kvm"), image_cmdline=IMAGE_CMDLINE,
                                agent_port=1).spec), tmp_path)
    with pytest.raises(VmRefused, match="needs KVM"):
        plan_vm(request(tmp_path, tdx=True), image_cmdline=IMAGE_CMDLINE, agent_port=1)


def test_config_goes_on_the_cmdline_when_it_fits_else_a_config_drive(tmp_path: Path) -> None:
    small = plan_vm(request(tmp_path, bootstrap_token="eebt1.x.y"),
                    image_cmdline=IMAGE_CMDLINE, agent_port=1)
    assert small.delivery == "cmdline" and small.spec.config_drive is None
    assert len(small.spec.cmdline.encode()) <= CMDLINE_LIMIT
    # the agent reads back exactly the planned config from that cmdline
    resolved = resolve_config(cmdline=small.spec.cmdline, config_drive=None,
                              default_config_path=tmp_path / "none.json")
    assert resolved.source == "cmdline" and resolved.config == small.config
    assert resolved.config.cp_url == "ws://10.0.2.2:9001/api/v2/agents/connect"
    # twenty pinned CP MRTDs do not fit: a config drive, the cmdline left as the image's
    mrtds = tuple(hashlib.sha384(bytes([i])).hexdigest() for i in range(20))
    big = plan_vm(request(tmp_path, trusted_cp_mrtds=mrtds), image_cmdline=IMAGE_CMDLINE,
                  agent_port=1)
    assert big.delivery == "config-drive"
    assert big.spec.cmdline == IMAGE_CMDLINE
    assert big.spec.config_drive == tmp_path / "vms/vm-1/config.iso"
    xml = domain_xml(big.spec)
    validate(xml, tmp_path)
    assert [d.find("target").get("dev") for d in ET.fromstring(xml).iter("disk")] == \
        ["vda", "vdb"]  # type: ignore[union-attr]
    # --measure: the same config is refused (no config drive for a measured VM)
    with pytest.raises(VmRefused, match="--measure refuses a config drive"):
        plan_vm(request(tmp_path, trusted_cp_mrtds=mrtds, measure=True),
                image_cmdline=IMAGE_CMDLINE, agent_port=1)
    measured = plan_vm(request(tmp_path, measure=True), image_cmdline=IMAGE_CMDLINE,
                       agent_port=1)
    assert "easyenclave.measurement=1" in measured.spec.cmdline


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VmRefused, match="VM name"):
        plan_vm(request(tmp_path, name="../etc"), image_cmdline=IMAGE_CMDLINE, agent_port=1)
    with pytest.raises(VmRefused, match="trusted_cp_mrtds"):
        plan_vm(request(tmp_path, trusted_cp_mrtds=("nothex",)), image_cmdline=IMAGE_CMDLINE,
                agent_port=1)
    with pytest.raises(ValueError):
        Labels(datacenter="bad label with spaces")


def dom(name: str, created: int, state: str = "running") -> DomainInfo:
    return DomainInfo(name, state, Labels(workdir=f"/vms/{name}", created=created))


def test_orphans_are_what_no_cp_knows_and_old_enough() -> None:
    domains = [dom("known", 0), dom("lost", 0, "shutoff"), dom("young", 950)]
    orphans = find_orphans(domains, ["known", "lost", "stray"], {"known": "online"},
                           now=1000.0, min_age_s=100)
    assert [(o.name, o.domain) for o in orphans] == [("lost", True), ("stray", False)]
    assert "no agent lost at the CP (shutoff" in orphans[0].reason
    assert find_orphans(domains, [], {"known": "offline", "lost": "offline"}, now=1000.0,
                        min_age_s=0) == [find_orphans([dom("young", 950)], [], {}, now=1000.0,
                                                      min_age_s=0)[0]]


def test_spec_rejects_impossible_vms(tmp_path: Path) -> None:
    base = plan_vm(request(tmp_path), image_cmdline=IMAGE_CMDLINE, agent_port=1).spec
    with pytest.raises(ValueError):
        DomainSpec(**{**_fields(base), "memory_mib": 64})
    with pytest.raises(ValueError):
        DomainSpec(**{**_fields(base), "tpm": True, "nvram": None})


def _fields(spec: DomainSpec) -> dict[str, object]:
    import attrs

    return {f.name: getattr(spec, f.name) for f in attrs.fields(DomainSpec)}


class _Host:
    """Just enough of VmHost for delete_vm: one domain whose labels name *workdir*."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.destroyed: list[str] = []

    def info(self, name: str) -> DomainInfo | None:
        return DomainInfo(name, "running", Labels(workdir=str(self.workdir)))

    def destroy(self, name: str) -> bool:
        self.destroyed.append(name)
        return True


def test_delete_never_removes_a_work_dir_outside_the_root(tmp_path: Path) -> None:
    from ee.vm.errors import VmError
    from ee.vm.manage import delete_vm

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep").write_text("x")
    host = _Host(outside)
    with pytest.raises(VmError, match="not touching it"):
        delete_vm("vm-1", host, tmp_path / "vms")  # type: ignore[arg-type]
    assert (outside / "keep").exists() and host.destroyed == []
    inside = tmp_path / "vms" / "vm-1"
    inside.mkdir(parents=True)
    (inside / "vm.json").write_text("{}")
    assert delete_vm("vm-1", _Host(inside), tmp_path / "vms") == [  # type: ignore[arg-type]
        "domain vm-1", f"work dir {inside}"]
    assert not inside.exists()


def test_delete_removes_only_vm_work_dirs_by_valid_names(tmp_path: Path) -> None:
    """A directory under the root that is not a VM's (no vm.json), or a name that is
    not a VM name, is never removed."""
    from ee.vm.errors import VmError
    from ee.vm.manage import delete_vm

    class NoDomain(_Host):
        def info(self, name: str) -> DomainInfo | None:
            return None

        def destroy(self, name: str) -> bool:
            return False

    root = tmp_path / "vms"
    docs = root / "docs"
    docs.mkdir(parents=True)
    (docs / "notes.txt").write_text("precious")
    with pytest.raises(VmError, match=r"no vm\.json"):
        delete_vm("docs", NoDomain(docs), root)  # type: ignore[arg-type]
    assert (docs / "notes.txt").exists()
    for bad in ("..", "Docs", "a/b", ""):
        with pytest.raises(VmError, match="not a VM name"):
            delete_vm(bad, NoDomain(docs), root)  # type: ignore[arg-type]


def test_prune_judges_only_this_cps_agent_domains() -> None:
    def labelled(name: str, **kw: Any) -> DomainInfo:
        return DomainInfo(name, "running", Labels(workdir=f"/vms/{name}", created=0, **kw))

    domains = [labelled("mine", api="http://cp:8000"), labelled("theirs", api="http://other"),
               labelled("cp-1", role="cp", api="http://cp:8000"), labelled("unlabelled")]
    orphans = find_orphans(domains, [], {}, now=1000.0, min_age_s=0, api="http://cp:8000/")
    assert [o.name for o in orphans] == ["mine", "unlabelled"]


def test_cloud_vms_power_off_when_their_cp_stays_unreachable(tmp_path: Path) -> None:
    cloud = plan_vm(request(tmp_path, poweroff_after_s=900.0, bootstrap_token="eebt1.a.b",
                            order_id="lo-1"), image_cmdline=IMAGE_CMDLINE, agent_port=1)
    assert cloud.config.terminal_action == "poweroff"
    assert cloud.config.unreachable_terminate_after_s == 900.0
    assert cloud.config.bootstrap_token == "eebt1.a.b" and cloud.spec.labels.order_id == "lo-1"
    plain = plan_vm(request(tmp_path), image_cmdline=IMAGE_CMDLINE, agent_port=1)
    assert plain.config.terminal_action == "exit"
    assert plain.config.unreachable_terminate_after_s is None
