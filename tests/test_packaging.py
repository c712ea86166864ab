"""The package claims one import name, sparsefusion: the repository's external/ folder is sparsefusion.external."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WITHOUT_INSTALL = """
import sys
sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
sys.path.insert(0, sys.argv[1])
import sparsefusion.external.nerf_network as module
print(module.__file__)
"""


def test_a_wheel_holds_sparsefusion_alone_with_external_inside(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy, so that building leaves the checkout as it is
    source.mkdir()
    shutil.copy(REPO / "setup.py", source)
    for package in ("sparsefusion", "external"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"sparsefusion"}
    assert "sparsefusion/external/nerf_network.py" in names and "sparsefusion/external/gridencoder/reference.py" in names


def test_a_checkout_imports_external_through_sparsefusion_without_installing():
    done = subprocess.run([sys.executable, "-c", WITHOUT_INSTALL, str(REPO)], capture_output=True, text=True,
                          cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "external" / "nerf_network.py"
