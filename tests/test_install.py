"""What a ``pip install``ed ckptconv needs beyond the code: the mapping tables travel in the wheel as
package data and load from any working directory. (CI also installs the wheel into a fresh venv
and converts a model outside the checkout: ``.ci/run``.)"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = dist.glob("ckptconv-*.whl")
    return path


def test_the_wheel_carries_every_registered_familys_table(wheel):
    """Oracle: the wheel's own file list, against the family registry."""
    from ckptconv.families import FAMILIES

    names = set(zipfile.ZipFile(wheel).namelist())
    for family in FAMILIES:
        assert f"ckptconv/mappings/{family.name}.toml" in names, family.name


def test_tables_load_from_the_installed_package_outside_the_checkout(wheel, tmp_path):
    """A fresh interpreter, working directory outside the repo, ckptconv imported from the unpacked
    wheel (not the checkout): every table loads, from inside that package. Oracle: the file bytes
    in the wheel (sha256) against what load_table read."""
    import hashlib

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import ckptconv, hashlib, json\n"
        "from ckptconv.core.mapping import load_table\n"
        "from ckptconv.families import FAMILIES\n"
        "print(json.dumps({'package': ckptconv.__file__, 'tables': {f.name: [str(load_table(f.name).path), "
        "load_table(f.name).sha256] for f in FAMILIES}}))\n"
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-c", probe], cwd=workdir, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    import json

    loaded = json.loads(result.stdout)
    assert loaded["package"].startswith(str(site))
    for name, (path, sha256) in loaded["tables"].items():
        assert path == str(site / "ckptconv" / "mappings" / f"{name}.toml")
        assert sha256 == hashlib.sha256((REPO / "mappings" / f"{name}.toml").read_bytes()).hexdigest()
