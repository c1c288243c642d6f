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
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("kipfix-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, package in IMPORT_ROOTS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and (
                    path.suffix in (".py", ".c") or path.parent.name == "data"):
                expected.add(f"{package}/{path.relative_to(ROOT / folder)}")
    assert expected - names == set()
