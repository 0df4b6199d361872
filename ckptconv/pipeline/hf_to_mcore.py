"""HF safetensors -> megatron-core torch_dist, streaming.

resolve source -> normalize config -> plan (mapping x layout) -> prove coverage -> stream tensors
through transforms -> write chunks -> record metadata -> rename into place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ckptconv.pipeline import distributed
from ckptconv.formats.array import BF16, F16, F32, Array
from ckptconv.errors import ConversionError
from ckptconv.families import normalize_config
from ckptconv.core.layout import ParallelLayout, tp_chunks
from ckptconv.formats.checksum import CHECKSUM, checksum_bytes, checksum_file
from ckptconv.pipeline.manifest import RELEASE_DIR, TRACKER_NAME, versions, write_manifest
from ckptconv.core.mapping import DEFAULT_KEY_LAYOUT, load_table
from ckptconv.core.source_layout import SourceLayout, bind, detect_source_layout
from ckptconv.pipeline.outdir import staged_output
from ckptconv.core.plan import Plan, PlanItem, build_plan, language_model_only as language_model_plan
from ckptconv.pipeline.report import Summary, make_progress
from ckptconv.pipeline.source import HFCheckpoint, missing_tokenizer_note, open_hf_checkpoint
from ckptconv.formats.torch_dist import EXTRA_STATE_BYTES_OBJECT, DistCheckpointWriter, LocalIndex, write_metadata
from ckptconv.families import get_family
from ckptconv.pipeline.training import DEFAULT_LAYOUT, RUN_CONFIG_NAME, TrainingMetadata
from ckptconv.core.transforms import RowBlocks, TransformContext

DTYPES = {"auto": None, "bf16": BF16, "fp16": F16, "fp32": F32}


@dataclass(frozen=True)
class PlannedConversion:
    source: HFCheckpoint
    plan: Plan
    source_layout: SourceLayout
    skipped: tuple[str, ...] = ()
    """HF tensors deliberately not converted (the vision parts under ``--language-model-only``)."""


def prepare(src: str, layout: ParallelLayout, language_model_only: bool = False, *,
            key_layout: str = DEFAULT_KEY_LAYOUT) -> PlannedConversion:
    """Everything that can fail before a byte is written: source, config, plan, coverage, shapes.

    ``key_layout`` names the Megatron model the keys are for: ``bridge`` (Megatron-Bridge's names) or
    another layout the family's table declares (``mimo``: megatron-core's MimoModel)."""
    source = open_hf_checkpoint(src)
    spec = normalize_config(source.config, where=str(source.root / "config.json"))
    table = load_table(spec.family).with_key_layout(key_layout)
    # The source's own spellings and optional tensors (the table's [[hf_prefix]] / [[source_flag]]).
    source_layout = detect_source_layout(table, spec, source.tensors)
    plan = build_plan(spec, bind(table, source_layout), layout)
    skipped: tuple[str, ...] = ()
    if language_model_only:
        plan, dropped = language_model_plan(plan)
        skipped = tuple(name for item in dropped for name in item.hf_names)
    check_coverage(plan, source, skipped)
    check_shapes(plan, source)
    return PlannedConversion(source, plan, source_layout, skipped)


def check_coverage(plan: Plan, source: HFCheckpoint, skipped: tuple[str, ...] = ()) -> None:
    """Every HF tensor is consumed exactly once (or deliberately skipped): none missing, none left over."""
    planned = plan.hf_names()
    missing = sorted(set(planned) - set(source.tensors))
    leftover = sorted(set(source.tensors) - set(planned) - set(skipped))
    if missing:
        raise ConversionError(
            f"{source.root}: {len(missing)} tensor(s) the {plan.spec.family} table needs are missing: {_names(missing)}"
        )
    if leftover:
        raise ConversionError(
            f"{source.root}: {len(leftover)} tensor(s) no {plan.spec.family} table row maps: {_names(leftover)}"
        )


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _dim(spec, token) -> int:
    if isinstance(token, int):
        return token
    value = 1
    for factor in str(token).split("*"):
        factor = factor.strip()
        if factor.isdigit():
            value *= int(factor)
        elif factor.startswith("vision."):
            value *= int(spec.vision[factor[len("vision."):]])
        elif hasattr(spec, factor):
            value *= int(getattr(spec, factor))
        else:
            value *= int(spec.dims[factor])
    return value


def check_shapes(plan: Plan, source: HFCheckpoint) -> None:
    """Shapes the table declares, checked against the safetensors headers before converting, and
    every transform run once on meta tensors so a mismatch surfaces before anything is written."""
    for item in plan.items:
        infos = [source.tensors[name] for name in item.hf_names]
        for info in infos:
            if not info.array_dtype.is_floating_point:
                raise ConversionError(f"{source.root / info.file}: tensor {info.name} has non-float dtype {info.dtype}")
        if item.rule.shape is not None:
            expected = tuple(_dim(plan.spec, d) for d in item.rule.shape)
            for info in infos:
                if info.shape != expected:
                    raise ConversionError(
                        f"{source.root / info.file}: tensor {info.name} has shape {list(info.shape)}, "
                        f"expected {list(expected)} from the config"
                    )
        metas = [Array.empty_meta(info.shape, info.array_dtype) for info in infos]
        transform = plan.table.transform_of(item.rule)
        outputs = (transform.forward_rows or transform.forward)(metas, _context(plan, item))
        if len(outputs) != len(item.targets):
            raise ConversionError(f"{item.label}: transform made {len(outputs)} tensors for {len(item.targets)} targets")


def _context(plan: Plan, item: PlanItem) -> TransformContext:
    return TransformContext(
        spec=plan.spec,
        indices=item.indices,
        padded_vocab_size=plan.padded_vocab_size,
        where=", ".join(item.hf_names),
        params=item.rule.params,
    )


def describe_plan(plan: Plan) -> list[dict]:
    """The dry-run listing: every HF key -> Megatron key and transform."""
    return [
        {
            "hf": list(item.hf_names),
            "mcore": [t.key + (f"[{','.join(map(str, t.axis_index))}]" if t.axis_index else "") for t in item.targets],
            "transform": item.rule.transform,
            "shard": item.rule.shard,
        }
        for item in plan.items
    ]


def assign_items(plan: Plan, source: HFCheckpoint, world_size: int) -> list[list[PlanItem]]:
    """Share the work over ranks by bytes (largest first onto the least loaded rank); each rank then
    converts its items in table order so reads stay mostly sequential."""
    loads = [0] * world_size
    owner: dict[int, int] = {}
    sized = sorted(
        enumerate(plan.items), key=lambda p: -sum(source.tensors[n].nbytes for n in p[1].hf_names)
    )
    for position, item in sized:
        rank = loads.index(min(loads))
        owner[position] = rank
        loads[rank] += sum(source.tensors[n].nbytes for n in item.hf_names)
    return [[item for position, item in enumerate(plan.items) if owner[position] == rank] for rank in range(world_size)]


def _chunk(tensor, offsets, sizes):
    """The chunk at ``offsets``/``sizes``. Row blocks split along rows stay blocks (no copy);
    anything else is sliced as a tensor."""
    if isinstance(tensor, RowBlocks):
        if tuple(offsets[1:]) == (0,) * (len(offsets) - 1) and tuple(sizes[1:]) == tuple(tensor.shape[1:]):
            return tensor.narrow_rows(offsets[0], sizes[0])
        tensor = tensor.materialize()
    return tensor[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def convert_item(plan: Plan, item: PlanItem, source: HFCheckpoint, writer: DistCheckpointWriter, dtype) -> int:
    """Read, transform, chunk and write one plan item. Returns bytes read."""
    # Wait until the writer has room before touching the next tensors: memory then holds one item
    # being read and what the writer has queued, never a backlog of items.
    writer.wait_for_room(sum(source.tensors[name].nbytes for name in item.hf_names))
    inputs = [source.read(name) for name in item.hf_names]
    bytes_read = sum(t.nbytes for t in inputs)
    transform = plan.table.transform_of(item.rule)
    outputs = (transform.forward_rows or transform.forward)(inputs, _context(plan, item))
    del inputs  # outputs may be views of the inputs: each mapping then goes with its last view
    tp = plan.layout.etp if item.rule.expert_parallel else plan.layout.tp
    for target, tensor in zip(item.targets, outputs):
        if dtype is not None and tensor.is_floating_point() and not item.rule.keep_dtype:
            tensor = tensor.to(dtype)
        global_shape = (*target.axis_sizes, *tensor.shape)
        lead = (1,) * len(target.axis_index)
        for _tp_rank, offsets, sizes in tp_chunks(item.rule.shard, tuple(tensor.shape), tp, target.name):
            writer.write_chunk(target.key, global_shape, (*target.axis_index, *offsets), _chunk(tensor, offsets, sizes),
                               shape=(*lead, *sizes))
        if item.rule.extra_state:
            writer.write_object(target.extra_state_fqn, EXTRA_STATE_BYTES_OBJECT)
    return bytes_read


def convert_hf_to_mcore(
    src: str,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int = 1,
    dtype: str = "auto",
    force: bool = False,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = False,
    io_threads: int = 4,
    language_model_only: bool = False,
    key_layout: str = DEFAULT_KEY_LAYOUT,
) -> Summary:
    if language_model_only and key_layout != DEFAULT_KEY_LAYOUT:
        raise ConversionError(
            f"--language-model-only writes a plain GPTModel without vision parts; --layout {key_layout} does not apply"
        )
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    rank, world_size = distributed.rank_and_world()
    layout = ParallelLayout(tp=tp, pp=pp, ep=ep, etp=etp, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    summary = Summary(command="hf-to-mcore", source=str(src), output=str(out), ranks=world_size)
    planned = distributed.first_error_everywhere(lambda: prepare(src, layout, language_model_only, key_layout=key_layout))
    source, plan = planned.source, planned.plan
    summary.notes.extend(_layout_notes(planned.source_layout))
    summary.family = plan.spec.family
    summary.layout = {"tp": tp, "pp": pp, "ep": ep, "etp": etp, "dtype": dtype, "padded_vocab_size": plan.padded_vocab_size,
                      "key_layout": key_layout}
    summary.notes.extend(plan.spec.filled_defaults)
    if planned.skipped:
        summary.notes.append(f"--language-model-only: {len(planned.skipped)} vision / projector tensor(s) not converted "
                             "(mcore-to-hf --hf-config SRC takes them from SRC)")
    tokenizer_note = missing_tokenizer_note([p.name for p in source.sidecar_files()], "the source")
    if tokenizer_note:
        summary.notes.append(tokenizer_note)
    my_items = assign_items(plan, source, world_size)[rank]
    target_dtype = DTYPES[dtype]

    with staged_output(out, force, is_writer=rank == 0) as staging:
        release = staging / RELEASE_DIR
        if rank == 0:
            release.mkdir()
        distributed.barrier()
        writer = DistCheckpointWriter(release, rank=rank, lanes=io_threads)
        error = None
        try:
            with make_progress(progress and rank == 0) as bar:
                task = bar.add_task("hf-to-mcore", total=sum(source.tensors[n].nbytes for i in my_items for n in i.hf_names))
                for item in my_items:
                    read = convert_item(plan, item, source, writer, target_dtype)
                    summary.bytes_read += read
                    summary.tensors_read += len(item.hf_names)
                    summary.tensors_written += len(item.targets)
                    summary.objects_written += len(item.targets) if item.rule.extra_state else 0
                    bar.advance(task, read)
            local_index = writer.close()
        except BaseException as exc:
            writer.abort()
            error = exc
        distributed.raise_if_any_failed(error)
        parts = distributed.gather_to_rank0(local_index)
        error = None
        if rank == 0:
            try:
                _finish_checkpoint(staging, release, out.resolve() / RELEASE_DIR, parts, plan, source, summary, dtype, layout,
                                   planned.source_layout, planned.skipped)
            except ConversionError as exc:
                error = exc
        distributed.raise_if_any_failed(error)
    source.close()
    return distributed.sum_counters(summary).finish()


def _layout_notes(source_layout: SourceLayout) -> list[str]:
    notes = [f"source stores {ours}* as {theirs}* (kept on export)" for ours, theirs in sorted(source_layout.prefixes.items())]
    notes += [f"source flag {name}: the tensor it names is read (and written back on export)"
              for name, value in sorted(source_layout.flags.items()) if value]
    return notes


def _finish_checkpoint(staging: Path, release: Path, final_release: Path, parts: list[LocalIndex], plan: Plan,
                       source: HFCheckpoint, summary: Summary, dtype: str, layout: ParallelLayout,
                       source_layout: SourceLayout, skipped: tuple[str, ...] = ()) -> None:
    _check_everything_written(plan, parts)
    hashes = {f"{RELEASE_DIR}/{name}": digest for part in parts for name, digest in part.file_hashes.items()}
    training = training_metadata(plan, source, summary.source, dtype, layout, language_model_only=bool(skipped))
    written = write_metadata(release, parts, checkpoint_id=str(final_release), common_state=training.common_state())
    hashes.update({f"{RELEASE_DIR}/{name}": digest for name, digest in written.items()})
    hashes[f"{RELEASE_DIR}/{RUN_CONFIG_NAME}"] = checksum_bytes(training.write_run_config(release))
    (staging / TRACKER_NAME).write_text("release")
    for sidecar in source.sidecar_files():
        shutil.copy2(sidecar, staging / sidecar.name)
        hashes[sidecar.name] = checksum_file(staging / sidecar.name)
    write_manifest(staging, {
        "format": "ckptconv/1",
        "family": plan.spec.family,
        "source": summary.source,
        "versions": versions(),
        "layout": {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "etp": layout.etp},
        "dtype": dtype,
        "padded_vocab_size": plan.padded_vocab_size,
        "make_vocab_size_divisible_by": layout.make_vocab_size_divisible_by,
        "vocab_padding": "zeros appended to embedding and output rows; dropped on export",
        "mapping_table": {"file": plan.table.path.name, "sha256": plan.table.sha256},
        # The source's spellings and optional tensors: export writes the names the source had.
        "source_layout": source_layout.as_json(),
        # Which Megatron model the keys are named for (bridge: Megatron-Bridge's; mimo: megatron-core's MimoModel).
        "key_layout": plan.table.key_layout,
        "hf_tensors": {name: {"dtype": info.dtype, "shape": list(info.shape), "file": info.file, "offset": info.offset}
                       for name, info in sorted(source.tensors.items())},
        # Where each source file's data began: export puts every tensor back at its source offset.
        "hf_files": {file: {"data_start": start} for file, start in sorted(_data_starts(source).items())},
        "checksum": CHECKSUM,
        "files": dict(sorted(hashes.items())),
        "filled_defaults": list(plan.spec.filled_defaults),
        # Not weights, but part of what the checkpoint computes: loaders must apply them.
        "rope_scaling": plan.spec.rope_scaling,
        "mtp_num_layers": plan.spec.mtp_num_layers,
        "language_model_only": bool(skipped),
        "not_converted": list(skipped),
    })
    summary.bytes_written = sum(p.bytes_written for p in parts)


def training_metadata(plan: Plan, source: HFCheckpoint, source_name: str, dtype: str, layout: ParallelLayout,
                      model_layout: str = DEFAULT_LAYOUT, language_model_only: bool = False) -> TrainingMetadata:
    """What Megatron-LM (``common.pt`` args) and Megatron-Bridge (``run_config.yaml``) read."""
    return TrainingMetadata(
        spec=plan.spec,
        family=get_family(plan.spec.family).training(plan.spec),
        layout=layout,
        padded_vocab_size=plan.padded_vocab_size,
        source=source_name,
        dtype=dtype if dtype != "auto" else _dominant_dtype(source),
        model_layout=getattr(plan.table, "key_layout", None) or model_layout,
        language_model_only=language_model_only,
    )


def _dominant_dtype(source: HFCheckpoint) -> str:
    """The floating dtype holding most of the source's bytes, as bf16 / fp16 / fp32."""
    by_dtype: dict[str, int] = {}
    for info in source.tensors.values():
        by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    names = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
    ranked = sorted(((n, names[d]) for d, n in by_dtype.items() if d in names), reverse=True)
    return ranked[0][1] if ranked else "bf16"


def _data_starts(source: HFCheckpoint) -> dict[str, int]:
    """Offset of each shard's data section: its first tensor's (safetensors leaves no gap)."""
    starts: dict[str, int] = {}
    for info in source.tensors.values():
        starts[info.file] = min(starts.get(info.file, info.offset), info.offset)
    return starts


def _check_everything_written(plan: Plan, parts: list[LocalIndex]) -> None:
    """Every Megatron key the plan promises is in the checkpoint, and nothing else."""
    expected = {t.key for item in plan.items for t in item.targets}
    expected_objects = set(plan.extra_state_fqns())
    written = {k for p in parts for k in p.tensors}
    written_objects = {k for p in parts for k in p.objects}
    missing = sorted((expected - written) | (expected_objects - written_objects))
    extra = sorted((written - expected) | (written_objects - expected_objects))
    if missing or extra:
        raise ConversionError(f"coverage proof failed: missing {_names(missing)}; unexpected {_names(extra)}")


def global_tensors_in_memory(src: str, layout: ParallelLayout | None = None, key_layout: str = DEFAULT_KEY_LAYOUT) -> dict:
    """Every Megatron tensor the plan would write, as whole global tensors in memory.

    For tests and small models only (this is exactly what streaming avoids): it lets a test check a
    Megatron model loaded from a written checkpoint against the HF source, key by key.
    """
    import torch

    planned = prepare(src, layout or ParallelLayout(), key_layout=key_layout)
    plan, source = planned.plan, planned.source
    out: dict[str, torch.Tensor] = {}
    for item in plan.items:
        inputs = [source.read(n).to_torch() for n in item.hf_names]
        outputs = plan.table.transform_of(item.rule).forward(inputs, _context(plan, item))
        for target, tensor in zip(item.targets, outputs):
            if target.key not in out:
                out[target.key] = torch.zeros((*target.axis_sizes, *tensor.shape), dtype=tensor.dtype)
            out[target.key][target.axis_index] = tensor
    source.close()
    return out
