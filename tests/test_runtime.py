"""layerskip.runtime: the CPU name every benchmark report records."""
import os
import platform
import re

import pytest

from layerskip import runtime


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpu_name_is_the_model_name_in_proc_cpuinfo():
    text = open("/proc/cpuinfo").read()
    m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    assert runtime.cpu_name() == (m.group(1).strip() if m else platform.processor() or platform.machine())


def test_cpu_name_falls_back_to_platform_without_proc_cpuinfo(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setitem(runtime.__dict__, "open", missing)
    assert runtime.cpu_name() == (platform.processor() or platform.machine())
    assert runtime.cpu_name()


def test_machine_name_names_the_host_the_cpu_and_its_count():
    assert runtime.machine_name() == f"{platform.node()} {runtime.cpu_name()}, {os.cpu_count()} cpus"
