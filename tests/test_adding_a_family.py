"""docs/adding-a-family.md and the registry agree.

Oracle: the document itself (hand-written: its list of files to touch, its registry snippet, its
package table) read against the registry and the tree. A family registered without one of the
files the document lists, a file the document names that no family has, or a family named in core
code outside its package, fails here.
"""

from __future__ import annotations

import importlib
import re

import pytest

from conftest import FAMILY_NAMES, REPO
from ckptconv.families import FAMILIES, get_family

DOC = (REPO / "docs" / "adding-a-family.md").read_text()
EXAMPLE = "qwen3_vl"


def files_to_touch() -> dict[str, str]:
    """``{path with the example's name: what the document says of it}`` from "The files to touch"."""
    section = DOC.split("## The files to touch", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return dict(re.match(r"(\S+)\s+(.*)", line).groups() for line in block.strip().splitlines())


def test_the_document_lists_the_package_table_and_registry_and_tests():
    paths = files_to_touch()
    assert f"mappings/{EXAMPLE}.toml" in paths and "ckptconv/families/__init__.py" in paths
    assert {p.rsplit("/", 1)[1] for p in paths if p.startswith(f"ckptconv/families/{EXAMPLE}/")} >= {
        "__init__.py", "config.py", "transforms.py", "model.py", "inputs.py", "fixtures.py"}
    assert f"tests/data/{EXAMPLE}_tiny_keys.json" in paths and "tests/oracles/hf_reference.py" in paths


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_registered_family_has_the_files_the_document_lists(family):
    fam = get_family(family)
    for path, note in files_to_touch().items():
        concrete = REPO / path.replace(EXAMPLE, family)
        if path.endswith("/transforms.py"):  # "only if the table names a transform the core lacks"
            assert concrete.is_file() == fam.has_transforms, f"{concrete} vs has_transforms={fam.has_transforms}"
        elif EXAMPLE in path:
            assert concrete.is_file(), f"{family}: {path.replace(EXAMPLE, family)} ({note}) is missing"
    # the shared files name it: the registry imports its FAMILY, the oracle has its reference
    registry = (REPO / "ckptconv" / "families" / "__init__.py").read_text()
    assert f"from ckptconv.families.{family} import FAMILY" in registry
    from oracles.hf_reference import REFERENCES

    assert family in REFERENCES


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_package_part_provides_what_the_document_says(family):
    """The package table: config.normalize; model.build_model / hf_config; inputs.verify_inputs;
    fixtures.make_tiny / real_width_config; transforms.TRANSFORMS (if any)."""
    fam = get_family(family)
    table = DOC.split("## 2. The package", 1)[1].split("\n\n", 2)[1]
    promised = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        module = cells[0].strip("`").removesuffix(".py")
        names = re.findall(r"`([A-Za-z_]+)(?:\(|\s*=)", cells[1])
        promised[module] = [n for n in names if n not in ("FAMILY",)]
    assert {"config", "model", "inputs", "fixtures", "__init__"} <= set(promised)
    listed = {p.rsplit("/", 1)[1].removesuffix(".py") for p in files_to_touch() if p.startswith(f"ckptconv/families/{EXAMPLE}/")}
    assert listed == set(promised), "the package table and the files to touch list different modules"
    for module, names in promised.items():
        if module == "__init__" or (module == "transforms" and not fam.has_transforms):
            continue
        part = importlib.import_module(f"ckptconv.families.{family}.{module}")
        assert names and all(hasattr(part, n) for n in names), (family, module, names)


def test_the_registry_snippet_is_the_registry_plus_the_example():
    snippet = re.search(r"FAMILIES = \((.*?)\)", DOC.split("## 3. The registry", 1)[1]).group(1)
    listed = [name.strip() for name in snippet.split(",")]
    assert listed[-1] == EXAMPLE.upper()
    assert listed[:-1] == [family.name.upper() for family in FAMILIES]


def test_the_readme_and_the_family_docs_name_every_family():
    readme = (REPO / "README.md").read_text()
    for family in FAMILIES:
        assert f"**{family.title}** (`{family.name}`" in readme, family.name
        assert f"docs/families/{family.name}.md" in readme, family.name


def test_no_code_outside_a_familys_package_names_it():
    """The core knows no family: pipeline, formats, verify, core and megatron code never spell a
    family's name or model_type (the registry and the fixtures' dispatch go through ``Family``)."""
    names = {model_type for family in FAMILIES for model_type in (family.name, *family.model_types)}
    offenders = []
    for path in (REPO / "ckptconv").rglob("*.py"):
        relative = path.relative_to(REPO / "ckptconv").as_posix()
        if relative.startswith("families/"):
            continue
        text = path.read_text()
        offenders += [f"{relative}: {name}" for name in names if name in text]
    assert offenders == []
