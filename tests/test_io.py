"""Checkpoint I/O: the streaming writer's files load with safetensors; the reader reads .bin safely."""

from __future__ import annotations

import json
import math
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import deserialize as st_deserialize
from safetensors import safe_open
from safetensors.torch import save_file

from skillgraft.errors import SkillgraftError
from skillgraft.io.outdir import OutputDir, check_output_dir, foreign_entries, skillgraft_files
from skillgraft.io.reader import CheckpointReader
from skillgraft.io.safetensors_header import DTYPE_BITS, header_length, parse
from skillgraft.io.resolve import resolve_checkpoint
from skillgraft.io.writer import ShardedWriter, TensorSpec, parse_size

TENSORS = {
    "a.weight": torch.randn(3, 5).to(torch.bfloat16),
    "b.index": torch.arange(7),
    "c.scalar": torch.tensor(1.5),
    "d.mask": torch.tensor([True, False, True]),
    "e.big": torch.randn(100, 3, dtype=torch.float16),
    "f.weight": torch.randn(40),
}


def _write(tmp_path, max_bytes):
    w = ShardedWriter(tmp_path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()], max_bytes)
    for k, v in TENSORS.items():
        w.write(k, v)
    return w.finish()


def test_single_shard_roundtrip(tmp_path):
    assert _write(tmp_path, 10**9) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in TENSORS.items():
            assert torch.equal(f.get_tensor(k), v), k


def test_sharded_roundtrip_and_index(tmp_path):
    files = _write(tmp_path, 300)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(TENSORS)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in TENSORS.values())
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names) == sorted(TENSORS)
    for k, v in TENSORS.items():
        assert reader.shape(k) == tuple(v.shape) and reader.dtype(k) == v.dtype
        assert torch.equal(reader.get(k), v), k


def test_writer_refuses_out_of_order(tmp_path):
    w = ShardedWriter(tmp_path, [TensorSpec("x", (2,), torch.float32), TensorSpec("y", (2,), torch.float32)], 100)
    with pytest.raises(RuntimeError, match="expected x"):
        w.write("y", torch.zeros(2))


def test_reader_bin_and_row_slices(tmp_path):
    state = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    r = CheckpointReader(tmp_path)
    assert r.format == "bin" and r.shape("w") == (6, 4)
    assert torch.equal(r.get_rows("w", 3), state["w"][:3])
    assert torch.equal(r.get("b"), state["b"])


def test_reader_sharded_bin(tmp_path):
    torch.save({"x": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"y": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"x": "pytorch_model-00001-of-00002.bin", "y": "pytorch_model-00002-of-00002.bin"}})
    )
    r = CheckpointReader(tmp_path)
    assert sorted(r.names) == ["x", "y"] and torch.equal(r.get("y"), torch.zeros(3))


class NotATensor:
    pass


def test_reader_refuses_unsafe_pickle(tmp_path):
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": NotATensor()}, f)
    with pytest.raises(SkillgraftError, match="weights_only=True"):
        CheckpointReader(tmp_path)


def test_reader_errors(tmp_path):
    with pytest.raises(SkillgraftError, match="not found"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(SkillgraftError, match="no weights"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(SkillgraftError, match="not a valid safetensors file"):
        CheckpointReader(tmp_path)


def test_index_naming_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(SkillgraftError, match="missing"):
        CheckpointReader(tmp_path)


def test_resolve_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SkillgraftError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint("some-org/some-model", "expert")
    with pytest.raises(SkillgraftError, match="not found"):
        resolve_checkpoint(str(tmp_path / "missing"), "vlm")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1500") == 1500
    with pytest.raises(SkillgraftError):
        parse_size("lots")


def test_output_dir_cleans_up_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with OutputDir(out, force=False) as target, target.stage() as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("record, content", [
    ("skillgraft_report.json", {"skillgraft_version": "0", "weight_files": ["model.safetensors"], "copied_files": ["config.json"]}),
    ("skillgraft_report.json", {"skillgraft_version": "0", "files": ["model.safetensors", "config.json"]}),
    ("skill.json", {"skillgraft_skill": 1, "files": ["model.safetensors", "config.json"]}),
])
def test_an_output_is_skillgraft_own_when_its_record_lists_its_files(tmp_path, record, content):
    """``force`` replaces a directory only when its record (a run's report, a skill's skill.json) is
    skillgraft's and names every file in it; the record, README.md and the files listed are skillgraft's."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.safetensors", "config.json", "README.md"):
        (out / name).write_text("x")
    (out / record).write_text(json.dumps(content))
    assert {"model.safetensors", "config.json", "README.md", record} <= skillgraft_files(out)
    assert foreign_entries(out) == []
    assert check_output_dir(out, force=True) == out.resolve()
    with pytest.raises(SkillgraftError, match="pass force=True"):
        check_output_dir(out, force=False)
    (out / "notes.txt").write_text("mine")
    assert foreign_entries(out) == ["notes.txt"]
    with pytest.raises(SkillgraftError, match="notes.txt"):
        check_output_dir(out, force=True)


@pytest.mark.parametrize("record, content", [
    ("skill.json", {"files": ["model.safetensors"]}),  # no format version: not a skillgraft skill
    ("skill.json", ["model.safetensors"]),
    ("skillgraft_report.json", {"files": ["model.safetensors"]}),
    ("skillgraft_report.json", "not json {"),
])
def test_a_record_that_is_not_skillgraft_own_makes_no_output_ours(tmp_path, record, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("x")
    (out / record).write_text(content if isinstance(content, str) else json.dumps(content))
    assert skillgraft_files(out) is None and foreign_entries(out) is None
    with pytest.raises(SkillgraftError, match="did not write"):
        check_output_dir(out, force=True)


def test_row_ranges_direct_and_buffered_read_the_same_bytes(tmp_path):
    """``read_rows`` reads only the rows asked for; with ``direct`` (O_DIRECT where the file system has it,
    offsets and buffers aligned to 4 KiB) the values are the same, whatever the tensor's offset."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {"a_odd": torch.arange(7, dtype=torch.uint8), "b16": torch.randn(1000, 333, generator=g).to(torch.bfloat16),
             "f32": torch.randn(77, 5, generator=g), "h16": torch.randn(3, 4097, generator=g).to(torch.float16),
             "scalar": torch.tensor(3.0)}
    save_file(state, str(tmp_path / "model.safetensors"))
    with CheckpointReader(tmp_path) as r:
        for name, t in state.items():
            if t.dim() == 0:
                assert torch.equal(r.get(name), t)
                continue
            n = t.shape[0]
            for a, b in ((0, 1), (n // 3, n // 2 + 1), (n - 1, n), (0, n)):
                for direct in (False, True):
                    got = r.read_rows(name, a, b, direct=direct)
                    assert torch.equal(got, t[a:b]) and got.dtype == t.dtype, (name, a, b, direct)
            got = r.read_rows(name, 0, n, direct=True)
            got.add_(1) if got.is_floating_point() else None  # a fresh, writable buffer
            assert not torch.equal(r.get(name), got) or not t.is_floating_point()


@pytest.mark.parametrize("direct", [False, True])
def test_writer_blocks_and_direct_io_give_the_same_file(tmp_path, direct):
    """Tensors written in row blocks (and, with ``direct``, through O_DIRECT pages cut to length) read back
    exactly, with the safetensors library."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    state = {"a": torch.randn(1001, 333, generator=g).to(torch.bfloat16), "b": torch.arange(5, dtype=torch.uint8),
             "c": torch.randn(3000, 2049, generator=g), "s": torch.tensor(2.5)}
    w = ShardedWriter(tmp_path, [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()], 20_000_000,
                      direct=direct)
    for k, v in state.items():
        if v.dim() == 0:
            w.write(k, v)
            continue
        for i in range(0, v.shape[0], 97):
            w.write_block(k, v[i : i + 97])
    files = w.finish()
    got = {}
    for f in files:
        if f.endswith(".safetensors"):
            got.update(load_file(str(tmp_path / f)))
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="more rows"):
        w2 = ShardedWriter(tmp_path / "x", [TensorSpec("a", (2, 3), torch.float32)], 10**9)
        (tmp_path / "x").mkdir()
        w2.write_block("a", torch.zeros(3, 3))


# ----------------------------------------------------------------------------- safetensors headers
def _st_file(header: dict, data_size: int, pad: int = 0) -> bytes:
    hb = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(hb)) + hb + bytes(data_size)


@st.composite
def valid_files(draw):
    """(file bytes, header) of a well-formed safetensors file: random dtypes and shapes, offsets tiling the data."""
    header: dict = {}
    pos = 0
    for i in range(draw(st.integers(0, 5))):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape.append(8)
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        header[f"t.{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    order = draw(st.permutations(sorted(header)))  # JSON order need not follow the offsets
    header = {k: header[k] for k in order}
    return _st_file(header, pos, pad=draw(st.integers(0, 7))), header


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                  st.text(max_size=4), st.lists(st.integers(-3, 9), max_size=3))


@st.composite
def mutated_files(draw):
    """A well-formed file after a few random edits of its header values, then maybe of its size or bytes."""
    raw, header = draw(valid_files())
    data_size = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["offset", "shift", "shift", "shape", "dtype", "drop", "junk", "metadata"]))
        if op == "metadata" or not names:
            header["__metadata__"] = draw(_JUNK)
            continue
        info = header[draw(st.sampled_from(names))]
        offsets = info.get("data_offsets")
        if op == "offset" and isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets):
            offsets[draw(st.integers(0, 1))] += draw(st.integers(-40, 40))
        elif op == "shift" and isinstance(offsets, list) and all(type(x) is int for x in offsets):
            shift = draw(st.integers(-12, 12))  # same size, other bytes: overlaps and holes
            info["data_offsets"] = [x + shift for x in offsets]
        elif op == "shape":
            info["shape"] = draw(st.lists(st.integers(-2, 6), max_size=3))
        elif op == "dtype":
            info["dtype"] = draw(st.sampled_from([*DTYPE_BITS, "Q7", "f32", ""]))
        elif op == "drop":
            info.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        else:
            info[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(_JUNK)
    raw = _st_file(header, data_size)
    delta = draw(st.sampled_from([0, 0, 0, 0, -1, 1, -4, 4, -16, 16]))
    raw = raw[:len(raw) + delta] if delta < 0 else raw + bytes(delta)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    return raw


def _check_file(raw: bytes) -> dict | None:
    """Parse ``raw`` as a whole file; only SkillgraftError may escape. When accepted, the entries must tile the
    data section exactly and the official library must accept the same file with the same tensors."""
    try:
        n = header_length(raw[:8], len(raw))
        entries = parse(raw[8:8 + n], len(raw))
    except SkillgraftError:
        return None
    data_size = len(raw) - 8 - n
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        assert e.begin == pos and 0 <= e.begin <= e.end <= data_size
        assert (e.end - e.begin) * 8 == math.prod(e.shape) * DTYPE_BITS[e.dtype]
        pos = e.end
    assert pos == data_size
    official = {name: (d["dtype"], d["shape"], len(d["data"])) for name, d in st_deserialize(raw)}
    assert official == {k: (e.dtype, list(e.shape), e.end - e.begin) for k, e in entries.items()}
    return entries


FUZZ = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(valid_files())
def test_header_parser_accepts_well_formed_files(case):
    raw, header = case
    entries = _check_file(raw)
    assert entries is not None and set(entries) == {k for k in header if k != "__metadata__"}


@FUZZ
@given(mutated_files())
def test_header_parser_on_mutated_headers(raw):
    _check_file(raw)


@FUZZ
@given(st.binary(max_size=120), st.integers(0, 200))
def test_header_parser_on_random_bytes(junk, n):
    _check_file(struct.pack("<Q", n) + junk)
    _check_file(junk)


def test_every_dtype_the_format_defines_is_read_or_refused_by_name(tmp_path):
    readable = {"U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
                "F8_E4M3": torch.float8_e4m3fn, "BOOL": torch.bool}
    for name, dtype in readable.items():
        d = tmp_path / name
        d.mkdir()
        t = torch.arange(6).reshape(2, 3).to(dtype)
        save_file({"w": t}, d / "model.safetensors")
        r = CheckpointReader(d)
        assert r.dtype("w") == dtype and torch.equal(r.get("w"), t), name
    for name in ("F4", "F6_E2M3", "F6_E3M2"):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(_st_file({"w": {"dtype": name, "shape": [2, 4], "data_offsets": [0, 8 * DTYPE_BITS[name] // 8]}}, 8 * DTYPE_BITS[name] // 8))
        with pytest.raises(SkillgraftError, match=f"dtype {name}, which skillgraft cannot read"):
            CheckpointReader(d)


@pytest.mark.parametrize("header,data,fragment", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, 8, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8, "after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, 8, "truncated"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12 bytes"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], }, "__metadata__": {"x": 1}}, 8, "__metadata__"),
    ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, "whole bytes"),
])
def test_header_refusals_name_the_problem(header, data, fragment):
    raw = _st_file(header, data)
    with pytest.raises(SkillgraftError, match=fragment):
        parse(raw[8:len(raw) - data], len(raw))


def test_header_length_limits():
    with pytest.raises(SkillgraftError, match="limit"):
        header_length(struct.pack("<Q", 100_000_001), 200_000_000)
    with pytest.raises(SkillgraftError, match="past the end"):
        header_length(struct.pack("<Q", 100), 50)
    with pytest.raises(SkillgraftError, match="too short"):
        header_length(b"\x01\x00", 2)


def test_duplicate_tensor_names_are_refused():
    hb = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(SkillgraftError, match="twice"):
        parse(hb, 8 + len(hb) + 1)


def test_hub_cache_links_into_blobs_are_followed(tmp_path):
    """A hub snapshot's files link into the repository's blobs/: inside, by the one exception to the rule."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, repo / "blobs" / "deadbeef")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    assert torch.equal(CheckpointReader(snap).get("w"), torch.ones(2))
    outside = tmp_path / "other"
    outside.mkdir()
    (outside / "model.safetensors").symlink_to(repo / "blobs" / "deadbeef")
    with pytest.raises(SkillgraftError, match="outside the checkpoint"):
        CheckpointReader(outside)


def test_output_is_flushed_to_disk_before_it_is_published(tmp_path, monkeypatch):
    """Every staged file and directory is fsync'ed before the rename that makes OUT visible, and OUT's
    parent after it, so a power loss never leaves a published OUT with incomplete files."""
    import os

    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "out"
    with OutputDir(out, force=False) as target, target.stage() as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    publish = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(out))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    staged = events[publish][1]
    assert {f"{staged}/model.safetensors", f"{staged}/sub/config.json", f"{staged}/sub", staged} <= synced_before
    assert ("fsync", str(tmp_path)) in events[publish + 1:]
    assert (out / "sub" / "config.json").read_text() == "{}"
