"""The wheels carried to the GPU machine, which reaches no package registry: build them, size them, check them there.

    python benchmarks/gpu_carry.py              # build dist/gpu-carry (make gpu-carry) and print the sizes
    python benchmarks/gpu_carry.py --check      # on the GPU machine: the carry is there and built from this tree
    python benchmarks/gpu_carry.py --names      # the distributions to install from it, one per line

What travels to the machine (the tracked and untracked files of the tree, plus the carry) must stay under
``LIMIT_BYTES``; the build fails loudly when it does not. The carry holds the package's own wheel and the pinned
wheels of requirements/gpu-carry.txt for CPython 3.12 on x86-64 Linux; ``carry.json`` beside them records a digest of
the package's sources, so that a carry built from another state of the tree is refused there. Standard library only:
the check runs with whatever Python the machine has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY_DIR = ROOT / "dist" / "gpu-carry"
REQUIREMENTS = ROOT / "requirements" / "gpu-carry.txt"
MANIFEST = "carry.json"
PACKAGE = "fastkvzip-press"
MIB = 2**20
LIMIT_BYTES = 64 * MIB  # everything that travels with one call: the tree and the carried paths
# The machine: CPython 3.12 on x86-64 Linux (manylinux tags pip matches exactly, newest first).
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


class CarryError(RuntimeError):
    """The carry is too large, incomplete, or built from another state of the tree."""


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    """The pinned requirements (``name==version``) of the carry list, comments and blank lines dropped."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    pins = [line for line in lines if line]
    for pin in pins:
        if not re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", pin):
            raise CarryError(f"{path.name}: {pin!r} is not a pinned name==version")
    return pins


def distribution_names(pins: list[str]) -> list[str]:
    """The package's own distribution, then every pinned one, by name (pip keeps a version already installed)."""
    return [PACKAGE, *(pin.split("==", 1)[0] for pin in pins)]


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the package's files (relative path and content, sorted), caches left out."""
    digest = hashlib.sha256()
    package = root / "fastkvzip_press"
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update((root / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def wheel_sizes(folder: Path) -> dict[str, int]:
    """Every wheel in ``folder`` and its size in bytes."""
    return {path.name: path.stat().st_size for path in sorted(folder.glob("*.whl"))}


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels besides the carried paths: the tracked files and the untracked ones git does not
    ignore (0 outside a git checkout, as on the GPU machine)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, check=True, capture_output=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return 0
    paths = (root / name for name in listed.decode().split("\0") if name)
    return sum(path.stat().st_size for path in paths if path.is_file() and not path.is_symlink())


def size_report(wheels: dict[str, int], tree: int, limit: int = LIMIT_BYTES) -> list[str]:
    """One line per wheel, then the totals; raises :class:`CarryError` when the tree and the carry pass ``limit``."""
    lines = [f"{size / MIB:8.2f} MiB  {name}" for name, size in sorted(wheels.items(), key=lambda item: -item[1])]
    carry = sum(wheels.values())
    lines += [
        f"{carry / MIB:8.2f} MiB  carry ({len(wheels)} wheels)",
        f"{tree / MIB:8.2f} MiB  tree (tracked and untracked files)",
        f"{(carry + tree) / MIB:8.2f} MiB  travels in all, limit {limit / MIB:.0f} MiB",
    ]
    if carry + tree > limit:
        raise CarryError("\n".join([*lines, f"OVER THE LIMIT by {(carry + tree - limit) / MIB:.2f} MiB"]))
    return lines


def _pip(*args: str, quiet: bool = False) -> None:
    """``pip args``; ``quiet``: its output only in the error raised."""
    command = [sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"]
    subprocess.run(command, check=True, capture_output=quiet)


def fetch(pin: str, folder: Path) -> None:
    """The wheel of ``pin`` for the machine; a project that publishes only a source archive is built here, which
    must give a pure-Python wheel."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    download = ["download", "--no-deps", "--only-binary=:all:", *TARGET, *platforms, "--dest", str(folder), pin]
    try:
        _pip(*download, quiet=True)
    except subprocess.CalledProcessError:
        before = set(folder.glob("*.whl"))
        _pip("wheel", "--no-deps", "--wheel-dir", str(folder), pin)
        built = set(folder.glob("*.whl")) - before
        if not built or any(not path.name.endswith("-none-any.whl") for path in built):
            raise CarryError(f"{pin}: no wheel for CPython 3.12 on x86-64, and no pure-Python wheel built") from None


def build(folder: Path = CARRY_DIR, pins: list[str] | None = None) -> dict[str, int]:
    """A fresh carry in ``folder``: the package's wheel, every pinned wheel, and the manifest."""
    pins = requirements() if pins is None else pins
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _pip("wheel", "--no-deps", "--wheel-dir", str(folder), str(ROOT))
    for pin in pins:
        fetch(pin, folder)
    wheels = wheel_sizes(folder)
    manifest = {"source_digest": source_digest(), "install": distribution_names(pins), "wheels": wheels}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return wheels


def check(folder: Path = CARRY_DIR, root: Path = ROOT) -> list[str]:
    """What the GPU machine verifies before installing: the manifest, every wheel it lists, and the digest of this
    tree's package sources. Returns the names to install."""
    path = folder / MANIFEST
    if not path.exists():
        raise CarryError(f"no {path}: build the carry with `make gpu-carry` and carry dist/gpu-carry")
    manifest = json.loads(path.read_text())
    missing = [name for name in manifest["wheels"] if not (folder / name).exists()]
    if missing:
        raise CarryError(f"wheels listed in {MANIFEST} are missing: {', '.join(missing)}")
    if manifest["source_digest"] != source_digest(root):
        raise CarryError("the carried package wheel was built from other sources than this tree: run `make gpu-carry`")
    return manifest["install"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="verify the carry against this tree (the GPU machine)")
    mode.add_argument("--names", action="store_true", help="print the distributions to install, one per line")
    parser.add_argument("--dir", type=Path, default=CARRY_DIR)
    args = parser.parse_args(argv)
    try:
        if args.names:
            print("\n".join(check(args.dir)))
            return 0
        wheels = wheel_sizes(args.dir) if args.check else build(args.dir)
        if args.check:
            check(args.dir)
        print("\n".join(size_report(wheels, tree_bytes())))
    except CarryError as error:
        print(f"gpu carry: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
