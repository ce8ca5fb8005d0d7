"""`lossfloor data prepare`: parquet shards round-trip exactly, reruns are no-ops, failures leave nothing."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import lossfloor.cli
import lossfloor.data.prepare
from lossfloor.data import (
    fingerprint,
    load,
    prepare_shards,
    read_meta,
    read_shard_rows,
    shard_paths,
    x_matrix,
)
from lossfloor.errors import InputError


@pytest.fixture
def labelled_npz(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 2, 3)).astype(np.float32), rng.integers(0, 4, size=10)
    np.savez(tmp_path / "src.npz", x=x, labels=y)
    return tmp_path / "src.npz", x, y


@pytest.fixture
def cli_main(monkeypatch):
    """lossfloor.cli.main with only this command registered (other commands are tested elsewhere)."""
    monkeypatch.setattr(lossfloor.cli, "COMMANDS", ["lossfloor.cli.data"])
    return lossfloor.cli.main


def snapshot(directory):
    """{name: (mtime_ns, size)} of a directory and its files."""
    entries = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()}
    entries["."] = (directory.stat().st_mtime_ns, 0)
    return entries


def test_round_trip_with_labels(labelled_npz, tmp_path):
    src, x, y = labelled_npz
    out = prepare_shards(src, tmp_path / "shards", rows_per_shard=3)
    assert out == tmp_path / "shards"
    files = shard_paths(out)
    assert [f.name for f in files] == [f"shard-0000{i}.parquet" for i in range(4)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3, 3, 3, 1]
    table = pq.read_table(files[1])
    assert table.schema.field("x").type == pa.list_(pa.float32(), 6)
    assert table.schema.field("index").type == pa.int64() and table.schema.field("label").type == pa.int64()
    assert table.column("index").to_pylist() == [3, 4, 5]
    assert table.column("label").to_pylist() == y[3:6].tolist()
    stored = np.array(table.column("x").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(stored, x[3:6].reshape(3, 6))

    meta = json.loads((out / "meta.json").read_text())
    original = load(src)
    assert meta == {"sample_shape": [2, 3], "dtype": "float32", "count": 10, "normalisation": "none",
                    "fingerprint": original.fingerprint, "source": str(src), "rows_per_shard": 3,
                    "has_labels": True, "format_version": 1}
    back = load(out)
    np.testing.assert_array_equal(back.samples, original.samples)
    np.testing.assert_array_equal(back.labels, y)
    assert back.samples.dtype == np.float32 and back.samples.shape == (10, 2, 3)
    assert back.fingerprint == original.fingerprint == fingerprint(x)
    assert back.normalisation == "none" and back.source == str(out)


def test_round_trip_without_labels_and_image_normalisation(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = prepare_shards(str(folder), tmp_path / "nested" / "shards", rows_per_shard=2)
    assert pq.read_table(shard_paths(out)[0]).column("label").null_count == 2
    original, back = load(folder), load(out)
    assert back.labels is None and back.normalisation == "uint8/127.5-1" == original.normalisation
    np.testing.assert_array_equal(back.samples, original.samples)
    assert back.fingerprint == original.fingerprint


def test_default_rows_per_shard_is_about_64_mib(labelled_npz, tmp_path):
    src, _, _ = labelled_npz
    out = prepare_shards(src, tmp_path / "s")
    assert read_meta(out).rows_per_shard == 64 * 2**20 // (4 * 6) and len(shard_paths(out)) == 1


def test_read_shard_rows_for_ray_batches(labelled_npz, tmp_path):
    src, x, y = labelled_npz
    out = prepare_shards(src, tmp_path / "s", rows_per_shard=4)
    table = pa.concat_tables([pq.read_table(f) for f in shard_paths(out)])  # several chunks
    rows = read_shard_rows(table.slice(3, 5))
    np.testing.assert_array_equal(rows.index, np.arange(3, 8))
    np.testing.assert_array_equal(rows.x, x[3:8].reshape(5, 6))
    np.testing.assert_array_equal(rows.labels, y[3:8])
    batch = pq.ParquetFile(shard_paths(out)[0]).read_row_group(0).to_batches()[0].slice(1, 2)  # offset slice
    column = batch.column("x")
    matrix = x_matrix(column)
    np.testing.assert_array_equal(matrix, x[1:3].reshape(2, 6))
    assert np.shares_memory(matrix, x_matrix(column))  # a view of the arrow buffer, not a copy
    per_row = np.empty(2, dtype=object)  # Ray's "numpy" format may give a column of per-row arrays
    per_row[0], per_row[1] = x[0].reshape(6), x[1].reshape(6)
    as_numpy = {"index": np.arange(2), "x": per_row, "label": np.array([None, None], dtype=object)}
    rows = read_shard_rows(as_numpy)
    np.testing.assert_array_equal(rows.x, x[:2].reshape(2, 6))
    assert rows.labels is None


def test_rerun_is_a_no_op(labelled_npz, tmp_path, caplog):
    src, _, _ = labelled_npz
    out = prepare_shards(src, tmp_path / "s", rows_per_shard=3)
    before = snapshot(out)
    with caplog.at_level(logging.INFO, logger="lossfloor.data.prepare"):
        assert prepare_shards(src, out, rows_per_shard=3) == out
        assert prepare_shards(src, out) == out  # default rows: accept the finished DIR
    assert "nothing to do" in caplog.text
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "src.npz"]  # no temporary left


def test_existing_dir_of_other_data_or_other_things(labelled_npz, tmp_path):
    src, x, _ = labelled_npz
    out = prepare_shards(src, tmp_path / "s", rows_per_shard=3)
    changed = x.copy()
    changed[9, 1, 2] += 1
    np.savez(tmp_path / "other.npz", x=changed)
    before = snapshot(out)
    with pytest.raises(InputError, match="other data") as info:
        prepare_shards(tmp_path / "other.npz", out, rows_per_shard=3)
    assert str(out) in str(info.value)
    with pytest.raises(InputError, match="rows_per_shard=3"):
        prepare_shards(src, out, rows_per_shard=5)
    assert snapshot(out) == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("mine")
    with pytest.raises(InputError, match="not a shard directory"):
        prepare_shards(src, tmp_path / "junk")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        prepare_shards(src, tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    assert load(prepare_shards(src, tmp_path / "empty")).fingerprint == load(src).fingerprint
    with pytest.raises(InputError, match="rows_per_shard"):
        prepare_shards(src, tmp_path / "zero", rows_per_shard=0)


def test_interrupted_write_leaves_no_dir(labelled_npz, tmp_path, monkeypatch):
    src, _, _ = labelled_npz
    real_write, calls = lossfloor.data.prepare.write_shard, []

    def interrupted(file, batch):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(file, batch)

    monkeypatch.setattr(lossfloor.data.prepare, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(src, tmp_path / "s", rows_per_shard=3)
    assert len(calls) == 2 and calls[0].parent.name.startswith(".s.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npz"]


def test_bad_values_mid_stream_leave_no_dir(tmp_path):
    a = np.zeros((10, 2))
    a[8, 0] = np.nan
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(InputError, match="sample 8"):
        prepare_shards(tmp_path / "nan.npy", tmp_path / "s", rows_per_shard=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]


def test_damaged_shard_dirs_are_rejected(labelled_npz, tmp_path):
    src, _, _ = labelled_npz
    out = prepare_shards(src, tmp_path / "s", rows_per_shard=3)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    with pytest.raises(InputError, match="fingerprint") as info:
        load(out)
    assert str(out) in str(info.value)
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "shard-00001.parquet").unlink()
    with pytest.raises(InputError, match=r"shard-00002\.parquet"):
        load(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(InputError, match=r"meta\.json"):
        load(out)


def test_cli_prepare_and_describe(labelled_npz, tmp_path, cli_main, capsys):
    src, _, _ = labelled_npz
    assert cli_main(["data", "prepare", str(src), "--out", str(tmp_path / "s"), "--rows-per-shard", "4"]) == 0
    assert read_meta(tmp_path / "s").rows_per_shard == 4
    assert load(tmp_path / "s").fingerprint == load(src).fingerprint
    capsys.readouterr()
    assert cli_main(["data", "describe", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "source": str(tmp_path / "s"), "count": 10, "sample_shape": [2, 3], "labels": True,
        "normalisation": "none", "values_read": True, "distinct": 10, "duplicates": 0, "largest_duplicate_group": 1}


def test_describe_counts_exact_duplicates_and_refuses_nan(tmp_path, cli_main, capsys):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    x[[5, 9, 13]] = x[2]  # a group of four
    x[17] = x[1]
    x[18] = -0.0 * x[18]  # zeros, some of them -0.0: the same value as +0.0
    x[19] = 0.0
    assert np.signbit(x[18]).any() and not np.signbit(x[19]).any()
    np.save(tmp_path / "d.npy", x)
    assert cli_main(["data", "describe", str(tmp_path / "d.npy")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["distinct"], d["duplicates"], d["largest_duplicate_group"]) == (15, 5, 4)
    assert cli_main(["data", "describe", str(tmp_path / "d.npy"), "--no-values"]) == 0
    assert json.loads(capsys.readouterr().out)["values_read"] is False
    x[11, 2] = np.nan
    np.save(tmp_path / "n.npy", x)
    assert cli_main(["data", "describe", str(tmp_path / "n.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sample 11" in err and "NaN" in err


@pytest.mark.parametrize("argv_tail, named", [
    (["missing.npy", "--out", "s"], "missing.npy"),
    (["src.npz", "--out", "s", "--rows-per-shard", "0"], "--rows-per-shard"),
])
def test_cli_bad_input_exits_2_with_one_line(labelled_npz, tmp_path, cli_main, capsys, monkeypatch, argv_tail,
                                            named):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["data", "prepare", *argv_tail]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_cli_registers_the_data_command():
    assert "lossfloor.cli.data" in lossfloor.cli.COMMANDS
