"""tropfast.fleet.writers: what a killed run left beside the outputs is found and removed."""
from __future__ import annotations

import os

import pytest

import tropfast
from tropfast.fleet import writers
from tropfast.fleet.writers import TMP_MARK, StaleTemps


def _plant(parent, name, folder=False):
    p = parent / name
    if folder:
        p.mkdir()
        (p / "inside.bin").write_bytes(b"x")
    else:
        p.write_bytes(b"x")
    return p


def test_leftovers_of_the_output_go_and_nothing_else(tmp_path, monkeypatch):
    mine_file = _plant(tmp_path, f".a{TMP_MARK}1x2")
    mine_dir = _plant(tmp_path, f".a{TMP_MARK}old-9", folder=True)
    other = _plant(tmp_path, f".ab{TMP_MARK}3")  # another output's ("ab", not "a")
    foreign = [_plant(tmp_path, ".a.tmp"), _plant(tmp_path, f"a{TMP_MARK}4"), _plant(tmp_path, "a")]
    listed = []
    real = os.listdir
    monkeypatch.setattr(writers.os, "listdir", lambda p: listed.append(p) or real(p))
    stale = StaleTemps()
    stale.clean(str(tmp_path / "a"))
    assert not mine_file.exists() and not mine_dir.exists()
    assert other.exists() and all(f.exists() for f in foreign)
    late = _plant(tmp_path, f".ab{TMP_MARK}made-by-this-run")  # after the listing: never touched
    stale.clean(str(tmp_path / "ab"))
    assert not other.exists() and late.exists()
    stale.clean(str(tmp_path / "c"))
    assert listed == [str(tmp_path)]  # one listing for the folder, whatever the number of outputs


def test_a_name_holding_the_mark_twice_is_found_for_either_base(tmp_path):
    both = _plant(tmp_path, f".x{TMP_MARK}y{TMP_MARK}z")
    StaleTemps().clean(str(tmp_path / f"x{TMP_MARK}y"))
    assert not both.exists()
    both = _plant(tmp_path, f".x{TMP_MARK}y{TMP_MARK}z")
    stale = StaleTemps()
    stale.clean(str(tmp_path / "x"))
    assert not both.exists()
    stale.clean(str(tmp_path / f"x{TMP_MARK}y"))  # listed there too: already gone, no error


def test_a_missing_folder_has_no_leftovers(tmp_path):
    StaleTemps().clean(str(tmp_path / "nothing" / "a"))
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_prune_saved_removes_a_killed_runs_temporaries(tmp_path, workers):
    from fleet_fixtures import make_fleet

    src = make_fleet(str(tmp_path / "src"), 3)
    out = tmp_path / "out"
    (out / "fleet").mkdir(parents=True)  # src/fleet/tK is written to out/fleet/tK
    left = [_plant(out / "fleet", f".t{k}{TMP_MARK}abc", folder=k == 1) for k in range(3)]
    keep = _plant(out / "fleet", f".t9{TMP_MARK}abc")  # no such output in this run
    rep = tropfast.prune_saved([src], str(out), keep=0.3, score="magnitude", workers=workers)
    assert rep.ok
    assert not any(p.exists() for p in left) and keep.exists()
    assert sorted(n for n in os.listdir(out / "fleet") if not n.startswith(".")) == ["t0", "t1", "t2"]
