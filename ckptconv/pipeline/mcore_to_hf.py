"""megatron-core torch_dist -> HF safetensors: the mapping table read backwards, streaming.

resolve checkpoint -> find config (ckptconv.json / --hf-config) -> normalize -> plan -> prove the
checkpoint holds exactly the plan's keys -> plan HF shards (transforms on meta tensors give every
shape) -> stream: read chunks, inverse transform, append to shard -> index, sidecars, rename.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ckptconv.pipeline import distributed
from ckptconv.formats.array import BF16, BY_SAFETENSORS, F16, F32, Array, DType
from ckptconv.errors import ConversionError
from ckptconv.families import normalize_config
from ckptconv.core.layout import ParallelLayout
from ckptconv.pipeline.manifest import read_manifest
from ckptconv.core.mapping import load_table
from ckptconv.core.source_layout import SourceLayout, bind, detect_source_layout
from ckptconv.pipeline.outdir import staged_output
from ckptconv.core.plan import LANGUAGE_MODEL_PREFIX, Plan, PlanItem, build_plan, language_model_only
from ckptconv.pipeline.report import Summary, make_progress
from ckptconv.formats.pages import WriterLanes
from ckptconv.formats.safetensors import PlannedTensor, Shard, ShardWriter, plan_shards, shards_like_source, write_index
from ckptconv.pipeline.source import HFCheckpoint, missing_tokenizer_note, open_hf_checkpoint, read_config, resolve_source
from ckptconv.formats.torch_dist import DistCheckpointReader
from ckptconv.core.transforms import TransformContext

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
DEFAULT_MAX_SHARD_SIZE = "5GB"
_CONFIG_DTYPES = {"bfloat16": BF16, "float16": F16, "float32": F32}


def parse_size(text: str) -> int:
    value = text.strip().upper()
    for unit, factor in sorted(_SIZE_UNITS.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    if value.isdigit():
        return int(value)
    raise ConversionError(f"--max-shard-size {text!r}: use a size like 5GB, 500MB or a byte count")


def _checkpoint_root(path: Path) -> Path:
    """The directory holding ckptconv.json / config.json: OUT for OUT/release, else the path itself."""
    path = Path(path)
    if path.name == "release" or path.name.startswith("iter_"):
        return path.parent
    return path


def _source_layout(table, spec, manifest: dict | None, hf_config: str | None) -> SourceLayout:
    """The spellings and optional tensors to write: what ckptconv.json recorded of the source; for a
    checkpoint ckptconv did not write, those of the ``--hf-config`` model when it has weights beside
    its config; else the table's own."""
    if manifest and "source_layout" in manifest:
        return SourceLayout.from_json(manifest["source_layout"], table)
    if hf_config:
        root = resolve_source(hf_config)
        if any(root.glob("*.safetensors")):
            from ckptconv.pipeline.source import open_hf_checkpoint

            source = open_hf_checkpoint(str(root))
            try:
                return detect_source_layout(table, spec, source.tensors)
            finally:
                source.close()
    return SourceLayout.from_json(None, table)


def _find_config(ckpt: Path, hf_config: str | None) -> tuple[dict, list[Path], dict | None]:
    """(config.json contents, sidecar files to copy, ckptconv manifest or None)."""
    root = _checkpoint_root(ckpt)
    manifest = read_manifest(root)
    if hf_config:
        config_root = resolve_source(hf_config)
    elif (root / "config.json").is_file():
        config_root = root
    else:
        raise ConversionError(
            f"{ckpt}: no config.json beside the checkpoint (it was not written by ckptconv); "
            "pass --hf-config with the HF model (dir or repo id) it was trained from"
        )
    config = read_config(config_root)
    sidecars = [
        p for p in sorted(config_root.iterdir())
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json", ".distcp"))
        and p.name not in ("ckptconv.json", "latest_checkpointed_iteration.txt") and not p.name.endswith(".py")
        and p.suffix in (".json", ".txt", ".model", ".jinja", ".tiktoken")
    ]
    return config, sidecars, manifest


def _table_for(family: str, reader: DistCheckpointReader, manifest: dict | None):
    """The family's table in the key layout the checkpoint's own keys use (bridge or mimo): read from
    the keys, so checkpoints trained and saved elsewhere export too; ckptconv.json must agree."""
    table = load_table(family)
    key_layout = table.detect_key_layout(reader.tensor_keys())
    recorded = (manifest or {}).get("key_layout")
    if recorded is not None and recorded != key_layout:
        raise ConversionError(
            f"{reader.directory}: ckptconv.json records key layout {recorded!r} but the checkpoint keys are {key_layout!r}"
        )
    return table.with_key_layout(key_layout)


def _padded_vocab_from_checkpoint(plan: Plan, reader: DistCheckpointReader) -> int:
    """Megatron pads the vocabulary by TP size at save time; the checkpoint says how much."""
    for item in plan.items:
        if item.rule.transform in ("pad_vocab", "pad_vocab_tied"):
            return reader.shape(item.targets[0].key)[0]
    return plan.padded_vocab_size


def check_checkpoint_keys(plan: Plan, reader: DistCheckpointReader) -> list[str]:
    """Every planned key is in the checkpoint with a consistent shape, and every checkpoint tensor
    under the model's prefixes is planned. Returns the checkpoint keys outside the model (e.g.
    optimizer state), which are ignored."""
    planned = {t.key: t for item in plan.items for t in item.targets}
    in_checkpoint = set(reader.tensor_keys())
    missing = sorted(set(planned) - in_checkpoint)
    if missing:
        raise ConversionError(
            f"{reader.directory}: not a complete {plan.spec.family} checkpoint of this config: "
            f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:4])}"
        )
    for key, target in planned.items():
        shape = reader.shape(key)
        if tuple(shape[: len(target.axis_sizes)]) != target.axis_sizes:
            raise ConversionError(
                f"{reader.directory}: {key} has shape {list(shape)}; the config expects leading axes {list(target.axis_sizes)}"
            )
    model_prefixes = {key.split(".", 1)[0] for key in planned}
    unplanned = sorted(k for k in in_checkpoint - set(planned) if k.split(".", 1)[0] in model_prefixes)
    if unplanned:
        raise ConversionError(
            f"{reader.directory}: {len(unplanned)} checkpoint tensor(s) the {plan.spec.family} table does not map: "
            f"{', '.join(unplanned[:4])}"
        )
    return sorted(k for k in in_checkpoint if k.split(".", 1)[0] not in model_prefixes)


def is_language_model_only(reader: DistCheckpointReader, manifest: dict | None) -> bool:
    """Written by ``hf-to-mcore --language-model-only`` (the manifest says so), or a plain GPTModel
    checkpoint (e.g. saved by Megatron-LM's pretrain_gpt): decoder keys, none under ``language_model.``."""
    if manifest and "language_model_only" in manifest:
        return bool(manifest["language_model_only"])
    keys = reader.tensor_keys()
    return not any(k.startswith(LANGUAGE_MODEL_PREFIX) for k in keys) and any(k.startswith("decoder.") for k in keys)


def vision_tensors(dropped: list[PlanItem], hf_config: str | None, ckpt) -> tuple[HFCheckpoint, list[PlannedTensor]]:
    """The HF tensors a language-model-only checkpoint lacks, read from ``--hf-config SRC`` unchanged."""
    if not hf_config:
        raise ConversionError(
            f"{ckpt}: a language-model-only checkpoint holds no vision weights; pass --hf-config SRC "
            "(the full HF model) to take them from"
        )
    source = open_hf_checkpoint(hf_config)
    names = [name for item in dropped for name in item.hf_names]
    missing = [name for name in names if name not in source.tensors]
    if missing:
        raise ConversionError(f"{source.root}: --hf-config lacks {len(missing)} vision tensor(s), e.g. {', '.join(missing[:4])}")
    return source, [PlannedTensor(name, source.tensors[name].array_dtype, tuple(source.tensors[name].shape)) for name in names]


def _context(plan: Plan, item: PlanItem) -> TransformContext:
    return TransformContext(
        spec=plan.spec, indices=item.indices, padded_vocab_size=plan.padded_vocab_size,
        where=", ".join(t.name for t in item.targets), params=item.rule.params,
    )


def _output_dtype(name: str, produced: DType, manifest: dict | None, config: dict) -> DType:
    if manifest and name in manifest.get("hf_tensors", {}):
        return BY_SAFETENSORS[manifest["hf_tensors"][name]["dtype"]]
    configured = config.get("dtype") or config.get("torch_dtype")
    return _CONFIG_DTYPES.get(configured, produced)


def plan_hf_tensors(plan: Plan, reader: DistCheckpointReader, manifest: dict | None, config: dict) -> list[PlannedTensor]:
    """Name, dtype and shape of every HF tensor, in plan order, without reading any data."""
    planned: list[PlannedTensor] = []
    for item in plan.items:
        metas = [Array.empty_meta(reader.shape(t.key)[len(t.axis_sizes):], reader.dtype(t.key)) for t in item.targets]
        transform = plan.table.transform_of(item.rule)
        # The streaming form where there is one (no meta-tensor concatenation, see hf_to_mcore).
        outputs = (transform.inverse_rows or transform.inverse)(metas, _context(plan, item))
        if len(outputs) != len(item.hf_names):
            raise ConversionError(f"{item.label}: inverse made {len(outputs)} tensors for {len(item.hf_names)} names")
        for name, meta in zip(item.hf_names, outputs):
            planned.append(PlannedTensor(name, _output_dtype(name, meta.dtype, manifest, config), tuple(meta.shape)))
    return planned


def convert_mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    hf_config: str | None = None,
    max_shard_size: str | None = None,
    force: bool = False,
    progress: bool = False,
    io_threads: int = 4,
) -> Summary:
    out = Path(out)
    rank, world_size = distributed.rank_and_world()
    summary = Summary(command="mcore-to-hf", source=str(ckpt), output=str(out), ranks=world_size)

    def prepare():
        reader = DistCheckpointReader(Path(ckpt))
        config, sidecars, manifest = _find_config(Path(ckpt), hf_config)
        spec = normalize_config(config)
        if manifest and manifest.get("family") not in (None, spec.family):
            raise ConversionError(f"{ckpt}: checkpoint is family {manifest['family']!r} but the config is {spec.family!r}")
        table = _table_for(spec.family, reader, manifest)
        plan = build_plan(spec, bind(table, _source_layout(table, spec, manifest, hf_config)), ParallelLayout())
        vision, vision_planned = None, []
        if is_language_model_only(reader, manifest):
            plan, dropped = language_model_only(plan)
            vision, vision_planned = vision_tensors(dropped, hf_config, ckpt)
        plan.padded_vocab_size = _padded_vocab_from_checkpoint(plan, reader)
        if plan.padded_vocab_size < spec.vocab_size:
            raise ConversionError(f"{ckpt}: checkpoint vocab {plan.padded_vocab_size} is smaller than the config's {spec.vocab_size}")
        ignored = check_checkpoint_keys(plan, reader)
        tensors = plan_hf_tensors(plan, reader, manifest, config) + vision_planned
        return reader, config, sidecars, plan, ignored, tensors, manifest or {}, vision

    reader, config, sidecars, plan, ignored, tensors, manifest, vision = distributed.first_error_everywhere(prepare)
    vision_names = set() if vision is None else {name for name in vision.tensors if name not in set(plan.hf_names())}
    summary.family = plan.spec.family
    summary.layout = {"padded_vocab_size": plan.padded_vocab_size, "key_layout": plan.table.key_layout}
    if ignored:
        summary.notes.append(f"ignored {len(ignored)} non-model checkpoint tensor(s), e.g. {ignored[0]}")
    tokenizer_note = missing_tokenizer_note([p.name for p in sidecars], "the config source" if hf_config else "the checkpoint")
    if tokenizer_note:
        summary.notes.append(tokenizer_note + (" (pass --hf-config with the HF model)" if not hf_config else ""))
    shards = None if max_shard_size else shards_like_source(
        tensors, manifest.get("hf_tensors", {}), {name: f["data_start"] for name, f in manifest.get("hf_files", {}).items()},
    )
    if shards is None:
        shards = plan_shards(tensors, parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE))
        summary.layout["max_shard_size"] = max_shard_size or DEFAULT_MAX_SHARD_SIZE
    else:
        summary.layout["shards"] = "as in the source"
    my_shards = [s for i, s in enumerate(shards) if i % world_size == rank]

    with staged_output(out, force, is_writer=rank == 0) as staging:
        distributed.barrier()
        error = None
        try:
            _write_shards(staging, my_shards, plan, reader, summary, progress and rank == 0, io_threads,
                          None if vision is None else (vision, [t.name for t in tensors if t.name in vision_names]))
        except BaseException as exc:
            error = exc
        distributed.raise_if_any_failed(error)
        if rank == 0:
            write_index(staging, shards)
            for sidecar in sidecars:
                shutil.copy2(sidecar, staging / sidecar.name)
        distributed.barrier()
    reader.close()
    if vision is not None:
        summary.notes.append(f"language-model-only checkpoint: vision tensors copied from {vision.root}")
        vision.close()
    summary = distributed.sum_counters(summary)
    expected_bytes = sum(t.nbytes for t in tensors)
    if summary.bytes_written != expected_bytes:  # the coverage proof in this direction
        raise ConversionError(f"wrote {summary.bytes_written} bytes of tensors, expected {expected_bytes}")
    return summary.finish()


def _write_shards(staging: Path, shards: list[Shard], plan: Plan, reader: DistCheckpointReader,
                  summary: Summary, progress: bool, io_threads: int,
                  vision: tuple[HFCheckpoint, list[str]] | None = None) -> None:
    wanted = {t.name: shard for shard in shards for t in shard.tensors}
    writers: dict[str, ShardWriter] = {}
    lanes = WriterLanes(io_threads)

    def write(name: str, tensor) -> None:
        shard = wanted.get(name)
        if shard is None:
            return
        writer = writers.get(shard.file_name)
        if writer is None:  # one lane per shard file (see WriterLanes)
            writer = writers[shard.file_name] = ShardWriter(staging, shard, lanes, lane=len(writers))
        written = writer.write(name, tensor)
        summary.tensors_written += 1
        summary.bytes_written += written
        bar.advance(task, written)

    try:
        with make_progress(progress) as bar:
            task = bar.add_task("mcore-to-hf", total=sum(s.nbytes for s in shards))
            for item in plan.items:
                if not any(name in wanted for name in item.hf_names):
                    continue
                inputs = [reader.read(t.key, t.axis_index) for t in item.targets]
                summary.tensors_read += len(inputs)
                summary.bytes_read += sum(t.nbytes for t in inputs)
                transform = plan.table.transform_of(item.rule)
                outputs = (transform.inverse_rows or transform.inverse)(inputs, _context(plan, item))
                del inputs  # outputs may be views of them: each mapping then goes with its last view
                for name, tensor in zip(item.hf_names, outputs):
                    write(name, tensor)
            # A language-model-only checkpoint: the vision tensors come unchanged from --hf-config.
            source, names = vision if vision is not None else (None, [])
            for name in names:
                if name in wanted:
                    write(name, source.read(name))
    finally:
        lanes.close()  # every queued write lands (or its error is raised) before the files close
        for writer in writers.values():
            writer.close()  # raises if a planned tensor never arrived
