"""`inspect`: statistics equal hand-computed values on small tensors, and the streamed numbers of a real
checkpoint triple equal a direct computation on the whole tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_weights

from skillgraft import cli
from skillgraft.analysis import inspect as inspect_mod
from skillgraft.analysis import inspect_pair, table
from skillgraft.analysis.stats import PairStats, block_stats, effective_rank
from skillgraft.analysis.vocab import compare


def test_block_stats_by_hand():
    tv = torch.tensor([3.0, -1.0, 2.0, 0.5])
    te = torch.tensor([-4.0, 1.0, 2.0, 0.0])
    b = torch.tensor([1.0, 2.0, 2.0, 4.0])
    s = block_stats(tv, te, b)
    # |tv|^2 = 9 + 1 + 4 + 0.25; |te|^2 = 16 + 1 + 4; <tv, te> = -12 - 1 + 4; |b|^2 = 1 + 4 + 4 + 16
    assert (s.n, s.vv, s.ee, s.ve, s.bb) == (4, 14.25, 21.0, -9.0, 25.0)
    # rms(tv) = sqrt(14.25 / 4) = 1.887: entries 0 and 2 are non-negligible; rms(te) = sqrt(21 / 4) = 2.291:
    # entry 0 only. Both: entry 0, where the signs differ
    assert (s.both, s.conflicts) == (1, 1)
    d = s.summary()
    assert d["norm_vlm"] == pytest.approx(math.sqrt(14.25)) and d["norm_expert"] == pytest.approx(math.sqrt(21))
    assert d["ratio"] == pytest.approx(math.sqrt(21 / 14.25))
    assert d["cosine"] == pytest.approx(-9 / math.sqrt(14.25 * 21))
    assert d["sign_conflict"] == 1.0 and d["both_non_negligible"] == 0.25
    assert d["rel_vlm"] == pytest.approx(math.sqrt(14.25) / 5) and d["rel_expert"] == pytest.approx(math.sqrt(21) / 5)
    # a lower threshold admits more entries: tv |x| >= 0.943 -> entries 0, 1, 2; te |x| >= 1.146 -> 0, 2
    s2 = block_stats(tv, te, b, threshold=0.5)
    assert (s2.both, s2.conflicts) == (2, 1)
    # signs examined on every 2nd entry only (large tensors): entries 0 and 2; norms stay exact
    s3 = block_stats(tv, te, b, threshold=0.5, stride=2)
    assert (s3.m, s3.both, s3.conflicts, s3.vv) == (2, 2, 1, 14.25)


def test_stats_add_up():
    a = PairStats(n=2, m=2, vv=1.0, ee=4.0, ve=-1.0, bb=9.0, both=1, conflicts=1)
    a += PairStats(n=2, m=2, vv=3.0, ee=0.0, ve=0.5, bb=7.0, both=1, conflicts=0)
    assert a.to_dict() == {"n": 4, "m": 4, "vv": 4.0, "ee": 4.0, "ve": -0.5, "bb": 16.0, "both": 2, "conflicts": 1}
    assert a.summary()["sign_conflict"] == 0.5 and a.summary()["cosine"] == pytest.approx(-0.5 / 4)
    assert PairStats().summary()["ratio"] is None  # undefined, not a division error


def test_effective_rank_rows_of_a_large_matrix(monkeypatch):
    monkeypatch.setattr(inspect_mod, "RANK_ROWS", 4)
    assert inspect_mod.rank_rows(4) is None
    assert inspect_mod.rank_rows(10).tolist() == [0, 3, 6, 9]
    x = torch.arange(40.0).reshape(10, 4)
    zero = torch.zeros(10, 4)
    _, kept = inspect_mod.entry_stats(zero, x, zero, 1.0, keep_expert_delta=True)
    assert torch.equal(kept, x[[0, 3, 6, 9]])


def test_effective_rank_by_hand():
    assert effective_rank(torch.diag(torch.tensor([3.0, 3.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 4.0))) == pytest.approx(1.0, abs=1e-6)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    expected = math.exp(-float((p * p.log()).sum()))  # 3.596...
    assert effective_rank(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))) == pytest.approx(expected)
    assert effective_rank(torch.zeros(3, 2)) == 0.0


def test_vocab_compare():
    same = compare({0: "a", 1: "b"}, {0: "a", 1: "b"})
    assert same["verdict"] == "same vocabulary"
    extended = compare({0: "a", 1: "b", 2: "<image>"}, {0: "a", 1: "b"})
    assert extended["vlm_only_ids"] == 1 and "adds 1" in extended["verdict"]
    bad = compare({0: "a", 1: "x"}, {0: "a", 1: "b"})
    assert bad["first_difference"] == {"id": 1, "vlm": "x", "expert": "b"} and "different tokens" in bad["verdict"]
    assert compare(None, {0: "a"})["verdict"].startswith("unknown")


def _direct(triple):
    """The overall statistics computed on whole tensors, straight from the files."""
    v, x, b = (load_weights(p) for p in (triple.vlm, triple.expert, triple.base))
    vv = ee = ve = bb = 0.0
    both = conflicts = n = 0
    for name, bt in b.items():
        tv = v["language_model." + name][: bt.shape[0]].double() - bt.double()  # the VLM's extra rows are not merged
        te = x[name].double() - bt.double()
        vv, ee, ve, bb = vv + float((tv * tv).sum()), ee + float((te * te).sum()), ve + float((tv * te).sum()), \
            bb + float((bt.double() ** 2).sum())
        big = (tv.abs() >= tv.pow(2).mean().sqrt()) & (te.abs() >= te.pow(2).mean().sqrt()) & (tv != 0) & (te != 0)
        both += int(big.sum())
        conflicts += int((big & ((tv > 0) != (te > 0))).sum())
        n += bt.numel()
    return vv, ee, ve, bb, both, conflicts, n


def test_inspect_equals_direct_computation(llava_triple, monkeypatch):
    ins = inspect_pair(llava_triple.vlm, llava_triple.expert, llava_triple.base, progress=False, rank_samples=3)
    vv, ee, ve, bb, both, conflicts, n = _direct(llava_triple)
    t = ins.total()
    assert t.n == n and (t.both, t.conflicts) == (both, conflicts)
    assert t.vv == pytest.approx(vv, rel=1e-5) and t.ee == pytest.approx(ee, rel=1e-5)
    assert t.ve == pytest.approx(ve, rel=1e-4, abs=1e-6) and t.bb == pytest.approx(bb, rel=1e-5)
    # per layer and per kind are partitions of the same sums
    assert sum(s.n for _, s in ins.per_layer()) + sum(s.n for k, s in ins.groups.items() if k[0] is None) == n
    assert sum(s.vv for _, s in ins.per_kind()) == pytest.approx(t.vv)
    assert len(ins.ranks) == 3 and all(0 < r["ratio"] <= 1 for r in ins.ranks)
    assert ins.lineage["vlm"]["rel_delta_norm"] == pytest.approx(math.sqrt(vv / bb), rel=1e-5)
    assert ins.lineage["expert"]["verdict"] == inspect_mod._verdict(math.sqrt(ee / bb))
    assert ins.norm_matched_scale() == pytest.approx(math.sqrt(vv / ee), rel=1e-5)
    # row blocks smaller than a tensor give the same norms (statistics are additive)
    monkeypatch.setattr(inspect_mod, "BLOCK_ELEMENTS", 64)
    small = inspect_pair(llava_triple.vlm, llava_triple.expert, llava_triple.base, progress=False, rank_samples=0)
    assert small.total().vv == pytest.approx(vv, rel=1e-5) and small.total().ve == pytest.approx(ve, rel=1e-4, abs=1e-6)
    # blocks measured side by side give exactly the one-worker result (sums are added in block order)
    ref = inspect_pair(llava_triple.vlm, llava_triple.expert, llava_triple.base, progress=False, rank_samples=3)
    par = inspect_pair(llava_triple.vlm, llava_triple.expert, llava_triple.base, progress=False, rank_samples=3,
                       workers=3)
    assert par.to_dict()["groups"] == ref.to_dict()["groups"] and par.ranks == ref.ranks


def test_inspect_without_base_measures_the_distance(llava_triple):
    ins = inspect_pair(llava_triple.vlm, llava_triple.expert, None, progress=False, rank_samples=0)
    v, x = load_weights(llava_triple.vlm), load_weights(llava_triple.expert)
    dd = sum(float(((x[n].double() - v["language_model." + n][: x[n].shape[0]].double()) ** 2).sum()) for n in x)
    s = ins.total().summary()
    assert s["norm_expert"] == pytest.approx(math.sqrt(dd), rel=1e-5) and s["cosine"] is None
    assert "no base" in table(ins)


def test_cli_inspect_writes_table_json_and_png(llava_triple, tmp_path, capsys):
    t = llava_triple
    j, png = tmp_path / "pair.json", tmp_path / "pair.png"
    assert cli.main(["inspect", str(t.vlm), str(t.expert), "--base", str(t.base), "--json", str(j),
                     "--plot", str(png), "-q"]) == 0
    out = capsys.readouterr().out
    assert "|tau_V|" in out and "tokenizer:" in out and "lineage:" in out
    data = json.loads(j.read_text())
    assert data["decoder_layers"] == 2 and len(data["per_layer"]) == 2 and data["overall"]["cosine"] is not None
    assert {"attention", "mlp", "norm", "embed", "lm_head"} == {g["kind"] for g in data["per_kind"]}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect_bad_input(llava_triple, tmp_path, capsys):
    from skillgraft.microworld.zoo import zoo_path

    t = llava_triple
    for argv in (["inspect", str(t.vlm), str(tmp_path / "nope"), "--base", str(t.base)],
                 ["inspect", str(t.vlm), str(t.expert), "--base", str(t.base), "--threshold", "0"],
                 ["inspect", str(zoo_path("vlm")), str(zoo_path("expert-multilingual-lora")), "--base",
                  str(zoo_path("base"))]):  # a LoRA adapter is not a checkpoint to compare
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
