"""The benchmark script runs and writes its report (a smoke test: nothing here is timed)."""

import json
import pathlib
import runpy
import sys

import jax

import registry

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "run.py"


def test_quick_benchmark_writes_table_json_and_plot(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--sizes", "10", "--classes", "4",
                                    "--dtypes", "float32", "--rounds", "2", "--softmax-classes", "3", "40", "--softmax-size", "8", "--softmax-odd-classes", "40", "--vocab-sizes", "96", "--vocab-tokens", "16",
                                    "--vocab-features", "8", "--out", str(tmp_path)])
  # The benchmark measures JAX's defaults (float32, standard promotion), not the suite's mode.
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
    runpy.run_path(str(SCRIPT), run_name="__main__")
  rows = json.loads((tmp_path / "results.json").read_text())
  impls = {(r["family"], r["impl"]) for r in rows}
  assert {("sigmoid", "jfocal"), ("sigmoid", "optax"), ("sigmoid", "naive"),
          ("softmax", "jfocal"), ("softmax", "optax CE"), ("softmax", "floor")} <= impls
  extended = {name for family, name in impls if family == "extended"}
  # The registry drives the table: every loss, against its textbook formula.
  assert {f"{impl} {name}" for name in registry.NAMES for impl in ("jfocal", "naive")} <= extended
  assert all(r["median_s"] > 0 for r in rows)
  table = (tmp_path / "results.md").read_text()
  assert "| sigmoid | float32 | 4 |" in table and "faster than optax" in table
  for name in registry.NAMES:
    assert f"| {name} | float32 | 4 |" in table
  assert "| focal | 40 | 6 |" in table and "| CE | 3 | 80 |" in table and "| CE | 40 | 7 |" in table
  assert "sigmoid losses' time over the floor kernel" in table
  assert "| asymmetric_loss, 0/1 integer targets | float32 | 4 |" in table
  assert "asymmetric_loss, 0/1 integer targets " in table.split("over the floor kernel")[1]
  assert (tmp_path / "results.png").stat().st_size > 0
  assert "| linear_softmax_focal_loss | 96 |" in table
  assert ("vocabulary", "dense matmul + optax CE") in impls
