"""The wheel (what the image and a plain pip install get) holds every package and data file."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOTS = {"agent": "kipfix/agent", "operator": "kipfix/operator", "bpf": "kipfix/bpf"}


def test_wheel_contains_every_package_and_data_file(tmp_path):
    # Build from a clean copy: setuptools would otherwise re-use a stale build/ folder.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("kipfix-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, package in IMPORT_ROOTS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and (
                    path.suffix == ".py" or path.parent.name == "data" or (folder == "bpf" and path.suffix == ".c")):
                expected.add(f"{package}/{path.relative_to(ROOT / folder)}")
    assert expected - names == set()
    # the C data-record encoder, built (the agent's BPF C is compiled at run time, this at install time)
    assert [n for n in names if n.startswith("kipfix/agent/export/ipfix/_flowpack.") and n.endswith(".so")]
