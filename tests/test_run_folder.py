"""lossfloor.train.run_folder: a training run's folder read back once, on a folder written by hand the way
the loop writes it (its tables with the loop's metadata, checkpoint folders)."""

import json

import pytest

from lossfloor.errors import InputError
from lossfloor.train import CURVE_SCHEMA, TRAIN_LOG_SCHEMA, TrainConfig
from lossfloor.train.curves import write_rows
from lossfloor.train.run_folder import CURVE_FILE, LOG_FILE, read_run_folder

CONFIG = TrainConfig(preset="tiny", batch_n_img=32, duration_n_img=64, run="hand")
META = {"flop_convention": "edm2", "forward_flops": "1234.5", "run": "hand", "config": json.dumps(CONFIG.to_dict()),
        "dataset_fingerprint": "sha256:abc", "started_at": "100.0", "written_at": "160.5"}
BASE = {"run": "hand", "model": "tiny", "params": 10}


def curve_rows():
    rows = []
    for step, images in ((1, 32), (2, 64)):
        for sigma, loss in ((2.0, 0.5 / step), (0.5, 0.2 / step), (None, 9.0 / step)):
            rows.append({**BASE, "step": step, "images": images, "flops": 3.0 * images, "sigma": sigma, "loss": loss,
                         "gap": None, "j_star": None, "j_star_ci_low": None, "j_star_ci_high": None, "log_var": None,
                         "total_learned": None, "loss_native": None, "j_star_native": None})
    return rows


LOG = [{**BASE, "step": s, "images": 32 * s, "flops": 96.0 * s, "sigma": None, "loss": 1.0 / s, "gap": None,
        "loss_x0": 0.5 / s, "lr": 0.01} for s in (1, 2)]


@pytest.fixture
def folder(tmp_path):
    write_rows(curve_rows(), CURVE_SCHEMA, tmp_path / CURVE_FILE, META)
    write_rows(LOG, TRAIN_LOG_SCHEMA, tmp_path / LOG_FILE, META)
    for n_img in (64, 32):
        (tmp_path / f"checkpoint-{n_img:012d}").mkdir()
        (tmp_path / f"checkpoint-{n_img:012d}" / "state.pt").write_bytes(b"")
    (tmp_path / "checkpoint-000000000096").mkdir()  # not complete: no state.pt
    return tmp_path


def test_the_folder_reads_back_its_rows_metadata_config_and_checkpoints(folder):
    run = read_run_folder(folder)
    assert run.path == folder and run.meta == META and run.config == CONFIG
    assert run.curve_rows == curve_rows() and run.log_rows == LOG
    assert run.run == "hand" and run.forward_flops == 1234.5 and run.span == (100.0, 160.5)
    assert run.checkpoints == (folder / "checkpoint-000000000032", folder / "checkpoint-000000000064")
    images, per_sigma, total = run.last_eval()
    assert images == 64 and [r["sigma"] for r in per_sigma] == [0.5, 2.0] and total["loss"] == 4.5


def test_a_missing_unreadable_or_foreign_table_is_named(folder):
    (folder / LOG_FILE).write_text("not parquet")
    with pytest.raises(InputError, match=f"{LOG_FILE}: not a readable parquet file"):
        read_run_folder(folder)
    (folder / LOG_FILE).unlink()
    with pytest.raises(InputError, match=f"{LOG_FILE}: not found"):
        read_run_folder(folder)
    write_rows(LOG, TRAIN_LOG_SCHEMA, folder / LOG_FILE, META)
    write_rows(curve_rows(), CURVE_SCHEMA, folder / CURVE_FILE, {"run": "hand"})
    with pytest.raises(InputError, match=f"{CURVE_FILE}: no training config"):
        read_run_folder(folder)
