"""Packages and package data (the project metadata is in pyproject.toml).

The mapping tables stay in ``mappings/`` at the top of the repository, the place people read and
edit them, and ship inside the package as ``ckptconv.mappings`` (package data, loaded with
``importlib.resources``), so an installed wheel converts from any directory. pyproject.toml alone
cannot map a directory outside the package tree into it next to automatic package discovery.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ckptconv*"]), "ckptconv.mappings"],
    package_dir={"ckptconv.mappings": "mappings"},
    package_data={"ckptconv.mappings": ["*.toml"]},
)
