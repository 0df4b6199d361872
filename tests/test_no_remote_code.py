"""ckptconv never runs code shipped with a checkpoint.

Oracle: a hand rule checked on our own source. Every ``Auto*.from_pretrained`` call (the classes
that can resolve ``auto_map`` to a checkpoint's own Python files) passes ``trust_remote_code=False``
explicitly. Left unset, transformers asks "run the custom code? [y/N]" on a terminal and a verify
of a remote-code release (ERNIE-4.5-VL Thinking ships ``auto_map`` in its tokenizer config) would
wait for an answer.
"""

import ast
from pathlib import Path

import ckptconv

SOURCE = Path(ckptconv.__file__).parent


def _auto_from_pretrained_calls():
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")):
                yield path.relative_to(SOURCE.parent), node


def test_every_auto_class_load_refuses_remote_code_explicitly():
    calls = list(_auto_from_pretrained_calls())
    assert calls, "the rule would pass vacuously: no Auto*.from_pretrained call found"
    unsafe = [
        f"{path}:{node.lineno}" for path, node in calls
        if not any(kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                   for kw in node.keywords)
    ]
    assert not unsafe, f"Auto*.from_pretrained without trust_remote_code=False: {unsafe}"
