"""The VM image's workload firewall script (``ee-workload-firewall``), run for real in a
throwaway network namespace (root and ``unshare`` needed; a VM boot test covers the
booted image): its rules, and that a second run (``systemctl restart``) neither fails
nor doubles them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = (Path(__file__).resolve().parents[2]
          / "image/rootfs/usr/lib/easyenclave/ee-workload-firewall")

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "iptables-save",
                                                            "ip6tables-save")),
    reason="needs root, unshare and iptables to run the script in a network namespace")


def _run_twice_and_save() -> tuple[int, str, str]:
    shell = (f"sh {SCRIPT} && sh {SCRIPT} && echo '#v4' && iptables-save "
             "&& echo '#v6' && ip6tables-save")
    done = subprocess.run(["unshare", "-n", "sh", "-c", shell], capture_output=True,
                          text=True, timeout=60, check=False)
    v4, _, v6 = done.stdout.partition("#v6")
    return done.returncode, v4, v6 + "\n" + done.stderr


def _rules(saved: str) -> list[str]:
    return [line for line in saved.splitlines() if line.startswith("-A ")]


@needs_netns
def test_firewall_script_is_idempotent_and_complete() -> None:
    code, v4, v6 = _run_twice_and_save()
    assert code == 0, (v4, v6)
    for saved in (v4, v6):
        rules = _rules(saved)
        assert len(rules) == len(set(rules)), rules  # a second run doubled nothing
        for link in ("docker0", "br-+"):
            assert f"-A INPUT -i {link} -j EE-WORKLOAD-IN" in rules
        assert "-A EE-WORKLOAD-IN -j DROP" in rules
    for dst in ("10.0.2.2/32", "10.0.2.3/32", "169.254.0.0/16"):
        assert f"-A PREROUTING -d {dst} -i br-+ -j DROP" in _rules(v4)
    for dst in ("fec0::2/128", "fec0::3/128", "fd00:ec2::254/128", "fd20:ce::254/128"):
        assert f"-A PREROUTING -d {dst} -i br-+ -j DROP" in _rules(v6)
