"""The README is the manual for a user outside the repository: it documents every option ``--help``
shows, for every command. Oracle: the command line's own definition (typer's click commands)."""

from __future__ import annotations

import typer

from conftest import REPO
from ckptconv.cli import app


def _options() -> dict[str, list[str]]:
    group = typer.main.get_command(app)
    context = type(group).context_class(group)
    options = {"": [opt for param in group.params for opt in param.opts if opt != "--help"]}
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        options[name] = [opt for param in command.params if param.param_type_name == "option"
                         for opt in (*param.opts, *param.secondary_opts) if opt != "--help"]
    return options


def test_every_option_of_every_command_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    undocumented = [f"{command or 'ckptconv'} {opt}" for command, opts in _options().items() for opt in opts
                    if f"`{opt}`" not in readme]
    assert not undocumented, f"README.md does not document: {', '.join(undocumented)} (see its 'Every option' tables)"


def test_the_readme_tells_how_to_install_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    for needed in ("pip install torch==2.13.0", "pip install /path/to/ckptconv", "HF_HUB_OFFLINE=1", "HF_HUB_CACHE",
                   "model.safetensors.index.json", "ckptconv --version"):
        assert needed in readme, needed
