"""Write the checkpoint key manifest of a family's Megatron model: {key: {shape, dtype, kind}}.

The manifest is the key contract between the converter (which writes these keys) and the Megatron
models verify loads into. Regenerate the golden file after a deliberate change of the model:

    .venv/bin/python scripts/dump_mcore_keys.py --family qwen2_5_vl --config tiny \
        --out tests/data/qwen2_5_vl_tiny_keys.json

``--model mimo`` dumps megatron-core's own ``MimoModel`` built for the family instead (the contract of
``hf-to-mcore --layout mimo``; golden files ``tests/data/<family>_mimo_tiny_keys.json``):

    for f in qwen2_5_vl ernie4_5_vl_moe step3p7; do .venv/bin/python scripts/dump_mcore_keys.py \
        --family $f --model mimo --config tiny --out tests/data/${f}_mimo_tiny_keys.json; done

``--config`` is a config.json path, an HF checkpoint directory, or ``tiny`` (the fixtures' tiny model
of the family, built in a temporary directory). Runs at TP=1 in a one-process group.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "ernie4_5_vl_moe", "step3p7")


def _config(family: str, config: str, tmp: Path) -> dict:
    if config == "tiny":
        from ckptconv.families import get_family

        config = str(get_family(family).make_tiny(tmp / "hf"))
    path = Path(config)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def manifest(family: str, config: dict, model_name: str = "bridge") -> dict:
    import torch

    from ckptconv.families import normalize_config
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import model_builder, sharded_manifest

    spec = normalize_config(config)
    if spec.family != family:
        raise SystemExit(f"config is family {spec.family!r}, not {family!r}")
    runtime.init_parallel(tp=1, device="cpu")
    padded = -(-spec.vocab_size // 128) * 128  # what the converter writes at TP=1
    model = model_builder(family, model_name)(spec, padded_vocab_size=padded, dtype=torch.float32)
    return sharded_manifest(model.sharded_state_dict())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--config", default="tiny", help="config.json, HF checkpoint dir, or 'tiny'")
    ap.add_argument("--model", default="bridge", choices=("bridge", "mimo"),
                    help="bridge: ckptconv's composition; mimo: megatron-core's MimoModel")
    ap.add_argument("--out", help="write here (default: stdout)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = manifest(args.family, _config(args.family, args.config, Path(tmp)), args.model)
    # One key per line: diffs of the golden file then read as "this key changed".
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()) + "\n}\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"{len(result)} keys -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
