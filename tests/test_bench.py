"""The benchmarks run (tiny sizes; their figures are read from `make bench`, never asserted here)."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import accumulation, average_memory, data_throughput, latency, train_throughput  # noqa: E402


def test_benchmarks_run_and_report_ratios(toy_data, capsys):
    assert {r["model"] for r in latency.main(["--reps", "1"])} == {"mobilenet_v3_large", "mobilenet_v3_small"}
    assert train_throughput.main(["--batch", "2", "--size", "64", "--steps", "1"])["ratio"] > 0
    assert data_throughput.main(["--data", str(toy_data), "--images", "16", "--reps", "1", "--size", "64"])["ratio"] > 0
    assert average_memory.main(["--n", "2"])["x_file"] > 0
    acc = accumulation.main(["--micro", "2", "--size", "32", "--blocks", "1"])
    assert acc["accumulate_1"] > 0 and acc["accumulate_8"] > 0
    out = capsys.readouterr().out
    assert out.count("machine: ") == 5
