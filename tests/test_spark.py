"""`--distributor spark` in Spark local mode gives the same shards as the process pool."""

from __future__ import annotations

import shutil

import pytest
from conftest import run_cli, write_csv

from pipeline import synthetic

pytest.importorskip("pyspark", reason="pyspark is installed by make test ('.[spark]')")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java 17+ on PATH", allow_module_level=True)


@pytest.mark.slow
def test_spark_local_mode_matches_multiprocessing(tmp_path):
    rows = []
    for i in range(7):
        synthetic.write_index_clip(tmp_path / "v" / f"{i}.mp4", 24 + 4 * i)
        rows.append([f"id{i}", f"caption {i}", 0, "d", "PT1S", f"v/{i}.mp4"])
    rows.append(["bad", "caption", 0, "d", "PT1S", "v/missing.mp4"])
    csv_path = write_csv(tmp_path / "w.csv", rows)
    common = ["--src", csv_path, "--samples_per_shard", 3, "--size", 48, "--workers", 2, "--progress", "False"]
    run_cli("pipeline.shard", *common, "--out", tmp_path / "mp")
    proc = run_cli("pipeline.shard", *common, "--out", tmp_path / "spark", "--distributor", "spark", timeout=300)
    assert "3 shard(s) written" in proc.stdout and "7 ok, 1 failed" in proc.stdout
    mp = {p.name: p.read_bytes() for p in (tmp_path / "mp").glob("*.tar")}
    spark = {p.name: p.read_bytes() for p in (tmp_path / "spark").glob("*.tar")}
    assert len(mp) == 3 and spark == mp
    rerun = run_cli("pipeline.shard", *common, "--out", tmp_path / "spark", "--distributor", "spark", timeout=300)
    assert "0 shard(s) written, 3 already complete" in rerun.stdout
