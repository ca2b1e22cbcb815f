"""engines.table: the one list of devices and precisions behind options, help text and refusals."""

from pathlib import Path

import pytest

from tests.cli import assert_one_line_refusal, run_cli
from tilecore.bench.measure import BACKENDS as BENCH_BACKENDS
from tilecore.runtime.engines import table
from tilecore.runtime.engines.base import EngineOptions
from tilecore.runtime.errors import TilecoreError


def test_every_list_comes_from_the_table() -> None:
    names = [b.name for b in table.BACKEND_TABLE]
    assert table.DEVICES == ("auto", *names)
    assert sorted(table.AUTO_ORDER) == sorted(names) and table.AUTO_ORDER[-1] == "cpu"  # cpu: the last resort
    assert BENCH_BACKENDS == (*names, "pytorch")
    assert all(set(b.precisions) <= set(table.RUN_PRECISIONS) for b in table.BACKEND_TABLE)
    assert set(table.PRECISIONS) == {"fp32", "fp16", "bf16", "int8", "auto"}
    assert all(name in table.device_help() for name in table.DEVICES)


def test_engine_options_are_refused_with_the_tables_names() -> None:
    with pytest.raises(TilecoreError, match=r"^--device 'gpu': expected one of auto, cpu, cuda, tensorrt, "):
        EngineOptions(device="gpu")
    with pytest.raises(TilecoreError, match=r"^--precision 'fp16': expected one of fp32, bf16, int8, auto$"):
        EngineOptions(precision="fp16")


def test_export_precisions_split_between_cpu_graphs_and_the_tensorrt_plan() -> None:
    assert table.split_export_precisions(("int8", "bf16"), tensorrt=False) == (("int8", "bf16"), ())
    assert table.split_export_precisions(("fp16", "int8", "bf16"), tensorrt=True) == (("bf16",), ("fp16", "int8"))
    with pytest.raises(TilecoreError, match=r"^--precision fp16: a TensorRT plan precision; add --tensorrt$"):
        table.split_export_precisions(("fp16",), tensorrt=False)
    with pytest.raises(TilecoreError, match=r"^--precision 'fp8': expected one or more of bf16, int8$"):
        table.split_export_precisions(("fp8",), tensorrt=False)


def test_export_refuses_a_tensorrt_precision_without_tensorrt(tmp_path: Path) -> None:
    proc = run_cli("export", tmp_path / "no-run", "--out", tmp_path / "b", "--precision", "fp16")
    assert_one_line_refusal(proc, r"--precision fp16: a TensorRT plan precision; add --tensorrt")
    assert not (tmp_path / "b").exists()
