"""The glibc compat step: the shim's C23 strto* semantics, the ELF edits, and no-op on new glibc."""
import importlib.util
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

COMPAT = REPO / "scripts" / "compat" / "glibc_compat.py"


def _load():
    spec = importlib.util.spec_from_file_location("glibc_compat", COMPAT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROGRAM = r"""
#include <errno.h>
#include <limits.h>
#include <stdio.h>
long __isoc23_strtol(const char*, char**, int);
long long __isoc23_strtoll(const char*, char**, int);
unsigned long __isoc23_strtoul(const char*, char**, int);
unsigned long long __isoc23_strtoull(const char*, char**, int);
int main(void) {
  char *end; long v; unsigned long u; long long ll; unsigned long long ull;
  v = __isoc23_strtol("0b101", &end, 0);   printf("%ld %s|\n", v, end);
  v = __isoc23_strtol(" -0B11x", &end, 2); printf("%ld %s|\n", v, end);
  v = __isoc23_strtol("0b101", &end, 10);  printf("%ld %s|\n", v, end);
  v = __isoc23_strtol("0b2", &end, 0);     printf("%ld %s|\n", v, end);
  v = __isoc23_strtol("0x1f", &end, 0);    printf("%ld %s|\n", v, end);
  v = __isoc23_strtol("-42z", &end, 10);   printf("%ld %s|\n", v, end);
  ll = __isoc23_strtoll("0b1111", &end, 0); printf("%lld %s|\n", ll, end);
  ull = __isoc23_strtoull("0b11", &end, 2); printf("%llu %s|\n", ull, end);
  errno = 0; u = __isoc23_strtoul("0b11111111111111111111111111111111111111111111111111111111111111111", &end, 0);
  printf("%d %d\n", u == ULONG_MAX, errno == ERANGE);
  errno = 0; v = __isoc23_strtol("-0b1000000000000000000000000000000000000000000000000000000000000000", &end, 0);
  printf("%d %d\n", v == LONG_MIN, errno == ERANGE);
  return 0;
}
"""

EXPECTED = ["5 |", "-3 x|", "0 b101|", "0 b2|", "31 |", "-42 z|", "15 |", "3 |", "1 1", "1 0"]


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("gcc") is None, reason="needs gcc/g++")
def test_shim_implements_c23_strto_semantics(tmp_path):
    shim = tmp_path / "libshim.so"
    _load().build_shim(shim)
    (tmp_path / "t.c").write_text(PROGRAM)
    subprocess.run(["gcc", str(tmp_path / "t.c"), str(shim), "-o", str(tmp_path / "t"),
                    f"-Wl,-rpath,{tmp_path}"], check=True)
    out = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == EXPECTED
    defined = subprocess.run(["nm", "-D", "--defined-only", str(shim)], capture_output=True, text=True).stdout
    for symbol in ("__isoc23_strtol", "__isoc23_strtoll", "__isoc23_strtoul", "__isoc23_strtoull",
                   "__cxa_call_terminate", "_ZSt21ios_base_library_initv"):
        assert symbol in defined


def test_elf_reader_finds_the_hosts_libc_versions():
    compat = _load()
    libs = compat.resolved_libraries(sys.executable)
    libc = next((p for name, p in libs.items() if name.startswith("libc.so")), None)
    if libc is None:
        pytest.skip("python is not dynamically linked against glibc here")
    versions = compat.Elf(compat.Path(libc)).defined_versions()
    assert "GLIBC_2.2.5" in versions
    major, minor = compat.glibc_version()
    assert f"GLIBC_{major}.{minor}" in versions and f"GLIBC_{major}.{minor + 1}" not in versions


def test_every_step_is_a_no_op_on_glibc_2_39(monkeypatch, tmp_path, capsys):
    compat = _load()
    monkeypatch.setattr(compat, "glibc_version", lambda: (2, 39))
    assert compat.main(["needed"]) == 1
    assert compat.main(["fetch", str(tmp_path / "w"), "--lock", str(REPO / "requirements/lock.txt")]) == 0
    assert compat.main(["patch", "--python", sys.executable]) == 0
    assert not (tmp_path / "w").exists()
    assert capsys.readouterr().out.count("nothing to do") == 2


def test_installed_extensions_load():
    """On this venv the step ran (or was not needed): both extensions import and work."""
    assert _load().main(["verify", "--python", sys.executable]) == 0
