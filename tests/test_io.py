"""Checkpoint I/O: the streaming writer's files load with safetensors; the reader reads .bin safely."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open

from skillgraft.errors import SkillgraftError
from skillgraft.io.outdir import atomic_output_dir
from skillgraft.io.reader import CheckpointReader
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
    with pytest.raises(SkillgraftError, match="not a readable safetensors"):
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


def test_atomic_output_dir_cleans_up_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, force=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


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
