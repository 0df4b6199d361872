"""Write the checkpoint key manifest of a family's Megatron model: {key: {shape, dtype, kind}}.

The manifest is the key contract between the converter (which writes these keys) and the Megatron
model verify and training load into: it is dumped from that model's own ``sharded_state_dict()``
(megatron-core modules), at TP=1 in a one-process group. The conformance suite
(``tests/test_conformance.py``) holds every registered family to its golden file
``tests/data/<family>_tiny_keys.json``. Regenerate them after a deliberate change of a model (and
read the diff: one key per line):

    .venv/bin/python scripts/dump_mcore_keys.py --all            # every family in the registry
    .venv/bin/python scripts/dump_mcore_keys.py --family step3p7 # one of them
    .venv/bin/python scripts/dump_mcore_keys.py --family qwen2_5_vl --config path/to/config.json --out -

``--model mimo`` dumps megatron-core's own ``MimoModel`` built for the family instead (the contract of
``hf-to-mcore --layout mimo``; golden files ``tests/data/<family>_mimo_tiny_keys.json``):

    .venv/bin/python scripts/dump_mcore_keys.py --all --model mimo

``--config`` is a config.json path, an HF checkpoint directory, or ``tiny`` (the family's tiny random
checkpoint, ``Family.make_tiny``, built in a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def golden_path(family: str, model_name: str = "bridge") -> Path:
    infix = "" if model_name == "bridge" else f"_{model_name}"
    return REPO / "tests" / "data" / f"{family}{infix}_tiny_keys.json"


def _config(family: str, config: str, tmp: Path) -> dict:
    from ckptconv.families import get_family

    if config == "tiny":
        config = str(get_family(family).make_tiny(tmp / family, seed=0))
    path = Path(config)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def manifest(family: str, config: dict, model_name: str = "bridge") -> dict:
    import torch

    from ckptconv.core.layout import ParallelLayout
    from ckptconv.families import normalize_config
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import model_builder, sharded_manifest

    spec = normalize_config(config)
    if spec.family != family:
        raise SystemExit(f"config is family {spec.family!r}, not {family!r}")
    runtime.init_parallel(tp=1, device="cpu")
    padded = ParallelLayout().padded_vocab_size(spec.vocab_size)  # what the converter writes at TP=1
    model = model_builder(family, model_name)(spec, padded_vocab_size=padded, dtype=torch.float32)
    return sharded_manifest(model.sharded_state_dict())


def render(result: dict) -> str:
    """One key per line: diffs of the golden file then read as "this key changed"."""
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    from ckptconv.families import FAMILIES

    names = [family.name for family in FAMILIES]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", choices=names)
    which.add_argument("--all", action="store_true", help="every registered family, tiny config, golden paths")
    ap.add_argument("--config", default="tiny", help="config.json, HF checkpoint dir, or 'tiny'")
    ap.add_argument("--model", default="bridge", choices=("bridge", "mimo"),
                    help="bridge: ckptconv's composition; mimo: megatron-core's MimoModel")
    ap.add_argument("--out", help="write here ('-': stdout; default: the family's golden file)")
    args = ap.parse_args(argv)
    if args.all and (args.config != "tiny" or args.out):
        ap.error("--all dumps the tiny configs to the golden files; --config/--out go with --family")
    with tempfile.TemporaryDirectory() as tmp:
        for family in names if args.all else [args.family]:
            text = render(manifest(family, _config(family, args.config, Path(tmp)), args.model))
            if args.out == "-":
                sys.stdout.write(text)
                continue
            out = Path(args.out) if args.out else golden_path(family, args.model)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"{family}: {text.count(chr(10)) - 2} keys -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
