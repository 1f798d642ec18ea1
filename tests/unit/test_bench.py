"""The benchmark report's arithmetic."""
import pytest

from hvdtrain.bench import bandwidths, figures, parse_size, ratio, scaling_efficiency, summarize, throughput_table
from hvdtrain.errors import UserError


def test_summary_is_median_and_spread():
    s = summarize([90.0, 110.0, 100.0, 95.0, 105.0])
    assert s == {"median": 100.0, "min": 90.0, "max": 110.0, "spread": 0.2, "windows": 5}
    with pytest.raises(ValueError):
        summarize([100.0, 0.0])


def test_scaling_ratio_and_bus_bandwidth():
    assert scaling_efficiency(one_rank=100.0, n_ranks=180.0, n=2) == pytest.approx(0.9)
    assert ratio(97.0, 100.0) == pytest.approx(0.97)
    algbw, busbw = bandwidths(1 << 20, 0.001, ranks=2)
    assert algbw == pytest.approx(1048576000.0) and busbw == pytest.approx(algbw)  # 2(n-1)/n = 1
    assert bandwidths(1 << 20, 0.001, ranks=4)[1] == pytest.approx(algbw * 1.5)


def test_sizes_parse():
    assert [parse_size(x) for x in ("4K", "1M", "256MiB", "1024")] == [4096, 1 << 20, 256 << 20, 1024]
    with pytest.raises(UserError):
        parse_size("lots")


def test_figures_from_runs():
    runs = [{"impl": i, "ranks": r, "samples_per_s": v} for i, r, v in [
        ("hvdtrain", 1, [100, 110]), ("hvdtrain", 2, [190, 200]), ("horovod", 1, [100]),
        ("horovod", 2, [200]), ("ddp", 1, [110]), ("ddp", 2, [180])]]
    table = throughput_table(runs)
    assert [(t["impl"], t["ranks"], t["median"]) for t in table][:2] == [("hvdtrain", 1, 105), ("hvdtrain", 2, 195)]
    allreduce = [{"impl": "horovod-gloo", "bytes": 1 << 20, "busbw": 9.0},
                 {"impl": "torch-gloo", "bytes": 1 << 20, "busbw": 10.0},
                 {"impl": "horovod-gloo", "bytes": 4096, "busbw": 1.0},
                 {"impl": "torch-gloo", "bytes": 4096, "busbw": 10.0}]
    out = figures(table, allreduce)
    assert out["hvdtrain_vs_horovod"] == pytest.approx(0.975)
    assert out["horovod_vs_ddp"] == pytest.approx(200 / 180)
    assert out["scaling_efficiency"]["hvdtrain"] == pytest.approx(195 / 210)
    assert out["allreduce_vs_torch"] == {"min": 0.9, "median": 0.9}  # only messages >= 1 MiB count


def test_a_failed_launch_is_recorded_and_the_rest_is_kept(tmp_path, monkeypatch):
    import json

    import hvdtrain.bench as bench_module
    from tests.conftest import ROOT

    def launch(cmd, out, what):  # stands in for the subprocess: ddp fails, horovod measures
        if what.startswith("ddp"):
            raise UserError(f"benchmark run {what} failed (exit 1):\nterminate called")
        return {"window_samples": [300], "window_seconds": [1.5]}
    monkeypatch.setattr(bench_module, "launch", launch)
    settings = bench_module.Settings(spec=ROOT / "examples" / "digits-mlp-torch.yaml", ranks=[1], rounds=2,
                                     windows=1, steps=1, warmup=0, impls=["horovod", "ddp"], sizes=[],
                                     output=tmp_path)
    with pytest.raises(UserError, match=r"2 benchmark run\(s\) failed \(ddp on 1 rank\(s\), round 1"):
        bench_module.bench(settings, log=lambda line: None)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [f["run"] for f in report["failures"]] == ["ddp on 1 rank(s), round 1", "ddp on 1 rank(s), round 2"]
    assert [(t["impl"], t["median"]) for t in report["throughput"]] == [("horovod", 200.0)]
    assert (tmp_path / "bench.png").stat().st_size > 0
