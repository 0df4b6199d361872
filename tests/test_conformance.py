"""The conformance suite: the same checks for every family in the registry.

A family added to ``ckptconv.families.FAMILIES`` is collected here with no edit to this file. It
passes when it brings its golden key file (``scripts/dump_mcore_keys.py --all``) and an independent
reference in ``tests/oracles/hf_reference.py``; ``docs/adding-a-family.md`` walks through it.

Every test names its oracle:

* **real megatron-core** -- the family's Megatron model (megatron-core modules) and its
  ``sharded_state_dict()``; ``dist_checkpointing.load`` with strict key checking;
* **real HF** -- the checkpoint's own on-disk tensors and ``transformers``' model of it;
* **independent reference** -- ``tests/oracles/hf_reference.py``: HF tensors -> Megatron tensors written
  by hand, no ckptconv table or transform;
* **self-consistency** -- the converter against its own inverse.

The fixtures are built once per session (``conftest.py``: :class:`FamilyCase`): the tiny random
checkpoint of each family and its conversions at TP=1, TP=2 and EP=2, shared by every test here and
by the per-family test files. Checks that need several processes run in one torchrun for all
families (:func:`parallel_runs`), so process start is paid once.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import FAMILY_NAMES, HELPERS, REPO, read_safetensors_dir, torchrun

GOLDEN = REPO / "tests" / "data"


def golden_keys(family: str) -> dict:
    """The family's golden key file ({} when it has none yet: the golden tests then fail by name)."""
    path = GOLDEN / f"{family}_tiny_keys.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def layouts(family: str, tp1: bool = True) -> list[tuple[int, int]]:
    """(tp, ep) layouts to check: TP=1 and TP=2 for every family, EP=2 where its Megatron model has
    experts (read off its golden keys; the converter refuses --ep for a dense model)."""
    has_experts = any(".experts." in key for key in golden_keys(family))
    return [(1, 1)] * tp1 + [(2, 1)] + [(1, 2)] * has_experts


def family_layouts(tp1: bool = True) -> list:
    return [pytest.param(family, tp, ep, id=f"{family}-tp{tp}-ep{ep}")
            for family in FAMILY_NAMES for tp, ep in layouts(family, tp1)]


def checkpoint_manifest(ckpt) -> dict:
    """``{key: {shape, dtype, kind}}`` of a torch_dist checkpoint, read from its ``.metadata``."""
    from ckptconv.formats.torch_dist import DistCheckpointReader

    reader = DistCheckpointReader(ckpt)
    entries = {key: {"shape": list(reader.shape(key)), "dtype": reader.dtype(key).torch_name, "kind": "tensor"}
               for key in reader.tensor_keys()}
    for fqn in reader.object_keys():
        key, shard = fqn.split("/shard_")
        entries[key] = {"shape": [int(x) for x in shard.split("_")[1].split(".")], "dtype": None, "kind": "object"}
    return dict(sorted(entries.items()))


# =========================================================================== keys and coverage


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_megatron_model_has_the_golden_keys(family, case):
    """Oracle: real megatron-core. The family's model, built at TP=1, asks for exactly the keys,
    global shapes, dtypes and ``_extra_state`` objects of the golden file (dumped from that model by
    ``scripts/dump_mcore_keys.py``): a change to the model shows up here as a diff of that file."""
    from ckptconv.core.layout import ParallelLayout
    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import sharded_manifest

    c = case(family)
    runtime.init_parallel(tp=1, device="cpu")
    model = c.family.build_model(c.spec, padded_vocab_size=ParallelLayout().padded_vocab_size(c.spec.vocab_size),
                                 dtype=torch.float32)
    assert sharded_manifest(model.sharded_state_dict()) == golden_keys(family)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_converted_checkpoint_has_exactly_the_golden_keys(family, case):
    """Oracle: real megatron-core (through the golden file). What hf-to-mcore writes at TP=1 --
    every key, global shape, dtype and object -- is what the model asks for, nothing more."""
    assert checkpoint_manifest(case(family).converted(1, 1)) == golden_keys(family)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_hf_tensor_is_read_once_and_every_megatron_tensor_written_once(family, case):
    """The coverage proof. Oracles: real HF (the checkpoint's on-disk tensor names) and real
    megatron-core (the golden keys). The plan consumes each on-disk tensor exactly once, and fills
    each slot (layer, expert) of each Megatron tensor exactly once."""
    from ckptconv.core.layout import ParallelLayout
    from ckptconv.fixtures import list_disk_tensors
    from ckptconv.pipeline.hf_to_mcore import prepare

    c = case(family)
    plan = prepare(str(c.hf_dir), ParallelLayout()).plan
    read = plan.hf_names()
    assert sorted(read) == sorted(list_disk_tensors(c.hf_dir)), "read twice or never"
    slots: dict[str, list] = {}
    for item in plan.items:
        for target in item.targets:
            slots.setdefault(target.key, []).append((target.axis_index, target.axis_sizes))
            if item.rule.extra_state:
                slots.setdefault(target.extra_state_key, []).append((target.axis_index, target.axis_sizes))
    assert set(slots) == set(golden_keys(family))
    for key, written in slots.items():
        indices = [index for index, _ in written]
        sizes = {sizes for _, sizes in written}
        assert len(sizes) == 1, key
        expected = 1
        for n in sizes.pop():
            expected *= n
        assert len(indices) == len(set(indices)) == expected, f"{key}: {len(indices)} writes of {expected} slots"


# =========================================================================== round trip


@pytest.mark.parametrize("family,tp,ep", family_layouts())
def test_round_trip_gives_back_the_source_files_byte_for_byte(family, tp, ep, case, tmp_path):
    """Oracle: real HF (the source's own files) -- HF -> torch_dist -> HF is the identity, tensor by
    tensor (dtype, shape, bits) and file by file, at every layout: TP and EP only change how tensors
    are chunked on disk (the inverse itself is self-consistency)."""
    from ckptconv.pipeline.mcore_to_hf import convert_mcore_to_hf

    c = case(family)
    convert_mcore_to_hf(c.converted(tp, ep), tmp_path / "hf")
    source, exported = read_safetensors_dir(c.hf_dir), read_safetensors_dir(tmp_path / "hf")
    assert sorted(exported) == sorted(source)
    assert [k for k, t in source.items() if exported[k].dtype != t.dtype or not torch.equal(exported[k], t)] == []
    for path in c.hf_dir.glob("*.safetensors"):
        assert (tmp_path / "hf" / path.name).read_bytes() == path.read_bytes(), path.name
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((c.hf_dir / "config.json").read_text())


# =========================================================================== strict load, parameters, logits


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tp1_checkpoint_loads_strictly_and_every_parameter_is_the_hf_one(family, case):
    """Oracles: real megatron-core (``dist_checkpointing.load``, strict: every key it asks for,
    nothing else) and the independent reference (every parameter equals the HF tensor put through
    the hand-written reference; vocab padding rows are zero)."""
    from check_loaded_model import check_parameters

    from ckptconv.megatron import runtime
    from ckptconv.megatron.load import build_and_load

    c = case(family)
    runtime.init_parallel(tp=1, device="cpu")
    model, spec = build_and_load(c.converted(1, 1))
    assert spec.family == family
    checked, differ = check_parameters(model, c.hf_dir, family)
    assert checked > 0 and differ == []


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tp1_logits_match_hf_on_text_and_on_an_image(family, case):
    """Oracle: real HF (``transformers``' model of the source). ``ckptconv verify`` loads the
    converted checkpoint strictly into the Megatron model and compares logits on the text-only and
    the image input: every figure within the fp32 tolerances, image tokens present."""
    report = case(family).verify(case(family).converted(1, 1))
    assert report.passed, report.as_dict()
    assert [r.name for r in report.results] == ["text-only", "image:synthetic"]
    text, image = report.results
    assert text.groups["image"] is None and image.groups["image"].n_tokens > 0
    assert all(m.max_abs <= 1e-4 for r in report.results for m in r.groups.values() if m is not None)


@pytest.fixture(scope="session")
def parallel_runs(case, tmp_path_factory) -> dict:
    """One two-process torchrun over every family at TP=2 and EP=2: strict load, parameters against
    the independent reference, logits against HF (tests/helpers/check_loaded_model.py). Returns
    ``{(family, tp, ep): [record of rank 0, record of rank 1]}`` and the run's output."""
    out = tmp_path_factory.mktemp("parallel_runs")
    runs = []
    for family in FAMILY_NAMES:
        for tp, ep in layouts(family, tp1=False):
            runs += [case(family).converted(tp, ep), case(family).hf_dir, tp, ep]
    result = torchrun([HELPERS / "check_loaded_model.py", "--out", out, "--logits", *runs], nproc=2, timeout=600)
    by_run: dict = {"_output": result.stdout[-3000:] + result.stderr[-3000:]}
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        by_run.setdefault((record["family"], record["tp"], record["ep"]), []).append(record)
    return by_run


@pytest.mark.parametrize("family,tp,ep", family_layouts(tp1=False))
def test_parallel_ranks_load_their_shards_strictly_and_match_hf(family, tp, ep, parallel_runs):
    """Oracles: real megatron-core (strict load by each of two gloo ranks, each holding its TP or EP
    shard; each shard's main replica on exactly one rank), the independent reference (each rank's
    parameter shards) and real HF (logits on text and image, fp32 <= 1e-4)."""
    ranks = parallel_runs.get((family, tp, ep), [])
    assert sorted(r["rank"] for r in ranks) == [0, 1], parallel_runs["_output"]
    for r in ranks:
        summary = {k: v for k, v in r.items() if k not in ("held", "main")}
        assert r["checked"] > 0 and r["differ"] == [], summary
        assert set(r["logits_max_abs"]) == {"text-only", "image:synthetic"}, summary
        assert max(r["logits_max_abs"].values()) <= 1e-4, summary
    # every shard any rank holds has exactly one main replica among the ranks (what a save writes)
    held = {json.dumps(shard) for r in ranks for shard in r["held"]}
    main = [json.dumps(shard) for r in ranks for shard in r["main"]]
    assert sorted(main) == sorted(held)


# =========================================================================== verify is not fooled


def kv_head_swap(case, ckpt) -> None:
    """Layer 0: the key rows of KV head 0 and KV head 1 exchanged inside ``linear_qkv``."""
    from tamper import hf_rows, swap_row_blocks

    d = case.spec.attention(0).head_dim
    k = hf_rows(case.hf_dir, r"layers\.0\.self_attn\.k_proj\.weight$")
    swap_row_blocks(ckpt, "self_attention.linear_qkv.weight", k[:d], k[d:2 * d])


def gate_row_swap(case, ckpt) -> None:
    """Layer 0: the output-gate rows of heads 0 and 1 exchanged inside ``linear_qkv`` (each head's
    ``g_proj`` row is stored head_dim times there)."""
    from tamper import hf_rows, swap_row_blocks

    d = case.spec.attention(0).head_dim
    g = hf_rows(case.hf_dir, r"layers\.0\.self_attn\.g_proj\.weight$")
    swap_row_blocks(ckpt, "self_attention.linear_qkv.weight", g[:1].repeat(d, 1), g[1:2].repeat(d, 1))


def pool_swap(case, ckpt) -> None:
    """First MoE layer: the routers of the two expert pools (text, vision) exchanged."""
    from tamper import swap_chunks

    layer = case.spec.layer_mlp_kinds.index("moe")
    routers = sorted(k for k in golden_keys(case.family.name) if re.search(rf"layers\.{layer}\.mlp\.\w+\.router\.weight$", k))
    assert len(routers) == 2, routers
    swap_chunks(ckpt, *routers)


def rejections(case) -> dict:
    """The wrong checkpoints verify must reject for this family: every family's (another seed's
    weights, two KV heads swapped), plus one per feature its spec has."""
    tamperings = {"kv-head-swap": kv_head_swap}
    if len(case.spec.num_experts) > 1:
        tamperings["pool-swap"] = pool_swap
    if any(re.search(r"layers\.0\.self_attn\.g_proj\.weight$", name) for name in read_safetensors_dir(case.hf_dir)):
        tamperings["gate-row-swap"] = gate_row_swap
    return tamperings


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_verify_rejects_other_weights(family, case):
    """Oracle: real HF. The checkpoint of another seed's weights (same shapes) fails verify on
    every input; the same verify passes the right checkpoint (test above), so it can tell."""
    c = case(family)
    report = c.verify(c.converted_other_seed())
    assert not report.passed and all(not r.passed for r in report.results), report.as_dict()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_verify_rejects_a_checkpoint_with_rows_swapped(family, case, tmp_path):
    """Oracle: real HF. A right conversion with one tensor's rows exchanged on disk -- two KV heads
    in layer 0 for every family; the two expert pools' routers where there are two pools (ERNIE);
    two heads' output-gate rows where ``linear_qkv`` carries a gate (Step3.7) -- fails verify."""
    import shutil

    c = case(family)
    tamperings = rejections(c)
    assert ("pool-swap" in tamperings) == (len(c.spec.num_experts) > 1)
    for name, tamper in tamperings.items():
        ckpt = shutil.copytree(c.converted(1, 1), tmp_path / name)
        tamper(c, ckpt)
        report = c.verify(ckpt)
        assert not report.passed, (name, report.as_dict())
        assert any(f.startswith("text: max_abs") for r in report.results for f in r.failures), (name, report.as_dict())
