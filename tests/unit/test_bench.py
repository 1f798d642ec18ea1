"""The benchmark report's arithmetic."""
import time

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


def run(impl, ranks, rates, allreduces=(5,), placement="host", samples=(64,), steps=(2,), round_=0):
    return {"impl": impl, "placement": placement, "ranks": ranks, "round": round_, "samples_per_s": rates,
            "window_samples": list(samples), "window_optimizer_steps": list(steps),
            "window_allreduces": list(allreduces)}


def test_figures_from_runs():
    runs = [run("hvdtrain", 1, [100, 110], [0]), run("hvdtrain", 2, [190, 200]), run("horovod", 1, [100], [0]),
            run("horovod", 2, [200]), run("ddp", 1, [110], [3]), run("ddp", 2, [180])]
    table = throughput_table(runs)
    assert [(t["impl"], t["ranks"], t["median"]) for t in table][:2] == [("hvdtrain", 1, 105), ("hvdtrain", 2, 195)]
    allreduce = [{"impl": "horovod-gloo", "bytes": 1 << 20, "busbw": 9.0},
                 {"impl": "torch-gloo", "bytes": 1 << 20, "busbw": 10.0},
                 {"impl": "horovod-gloo", "bytes": 4096, "busbw": 1.0},
                 {"impl": "torch-gloo", "bytes": 4096, "busbw": 10.0}]
    out = figures(table, allreduce)
    assert out["hvdtrain_vs_horovod"] == pytest.approx(0.975)
    assert out["horovod_vs_ddp"] == pytest.approx(200 / 180)
    assert out["hvdtrain_vs_ddp"] == pytest.approx(195 / 180)
    assert out["scaling_efficiency"]["hvdtrain"] == pytest.approx(195 / 210)
    # the 1-rank baselines: Horovod allreduced nothing, DDP ran its reducer
    assert out["one_rank_baseline_communicated"] == {"hvdtrain": False, "horovod": False, "ddp": True}
    assert out["allreduce_vs_torch"] == {"min": 0.9, "median": 0.9}  # only messages >= 1 MiB count


def test_no_ratio_between_implementations_at_one_rank():
    table = throughput_table([run("hvdtrain", 1, [100], [0]), run("horovod", 1, [120], [0]),
                              run("ddp", 1, [100], [3])])
    out = figures(table, [])
    assert out == {"note": "single rank: no communication measured",
                   "single_rank_step_loops": {"hvdtrain_vs_horovod": pytest.approx(100 / 120)}}
    assert "horovod_vs_ddp" not in out  # DDP runs its reducer at one rank, Horovod nothing


def test_gpu_resident_runs_are_labelled_and_compared_apart():
    runs = [run("hvdtrain", 2, [90]), run("horovod", 2, [100]), run("horovod", 2, [130], placement="resident"),
            run("ddp", 2, [100]), run("ddp", 2, [120], placement="resident")]
    table = throughput_table(runs)
    assert [t["impl"] for t in table] == ["hvdtrain", "horovod", "horovod-gpu-resident", "ddp", "ddp-gpu-resident"]
    out = figures(table, [])
    assert out["hvdtrain_vs_horovod"] == pytest.approx(0.9)  # against the loop fed from the host
    assert out["hvdtrain_vs_horovod_gpu_resident"] == pytest.approx(90 / 130)
    assert out["horovod_vs_ddp_gpu_resident"] == pytest.approx(130 / 120)


def test_unequal_work_is_found_from_the_workers_counts():
    from hvdtrain.bench import unequal_work
    same = [run("hvdtrain", 2, [1]), run("horovod", 2, [1]), run("ddp", 2, [1])]
    assert unequal_work(same) == []
    fewer_steps = same + [run("local", 2, [1], steps=(1,))]
    problems = unequal_work(fewer_steps)
    assert len(problems) == 1 and "local round 1: samples [64], steps [1]" in problems[0]


def test_settings_a_loop_cannot_follow_are_refused():
    from hvdtrain.bench import refused_settings
    from hvdtrain.spec import load_spec
    from tests.conftest import ROOT
    base = ROOT / "examples" / "digits-mlp-torch.yaml"
    assert refused_settings(load_spec(base), ["hvdtrain", "horovod", "ddp"], 10, 2) == []
    adasum = load_spec(base, ["horovod.adasum=true"])
    assert refused_settings(adasum, ["hvdtrain", "horovod"], 10, 2) == []
    assert "DDP has no Adasum" in refused_settings(adasum, ["hvdtrain", "ddp"], 10, 2)[0]
    passes = load_spec(base, ["horovod.backward_passes_per_step=4"])
    assert "multiples of it" in refused_settings(passes, ["hvdtrain"], 10, 4)[0]
    assert refused_settings(passes, ["hvdtrain", "horovod", "ddp"], 12, 4) == []
    clipped = load_spec(base, ["train.grad_clip_norm=1.0"])
    assert refused_settings(clipped, ["hvdtrain", "tensorflow"], 10, 2) == []
    assert "do not clip" in refused_settings(clipped, ["hvdtrain", "local"], 10, 2)[0]


def test_a_failed_launch_is_recorded_and_the_rest_is_kept(tmp_path, monkeypatch):
    import json

    import hvdtrain.bench as bench_module
    from tests.conftest import ROOT

    def launch(cmd, out, what):  # stands in for the subprocess: ddp fails, horovod measures
        if what.startswith("ddp"):
            raise UserError(f"benchmark run {what} failed (exit 1):\nterminate called")
        return {"window_samples": [300], "window_seconds": [1.5], "window_optimizer_steps": [5],
                "window_allreduces": [0], "startup_phases": {"launcher": 1.0, "set-up": 2.0, "warm-up": 0.5}}
    monkeypatch.setattr(bench_module, "launch", launch)
    settings = bench_module.Settings(spec=ROOT / "examples" / "digits-mlp-torch.yaml", ranks=[1], rounds=2,
                                     windows=1, steps=1, warmup=0, impls=["horovod", "ddp"], sizes=[],
                                     output=tmp_path)
    with pytest.raises(UserError, match=r"2 benchmark run\(s\) failed \(ddp on 1 rank\(s\), round 1"):
        bench_module.bench(settings, log=lambda line: None)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [f["run"] for f in report["failures"]] == ["ddp on 1 rank(s), round 1", "ddp on 1 rank(s), round 2"]
    assert [(t["impl"], t["median"], t["startup_s"]) for t in report["throughput"]] == [("horovod", 200.0, 3.5)]
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_step_is_timed_from_its_last_gradient_to_its_end():
    """The wait after backward (allreduces, update) is what separates Horovod from DDP
    on a CPU: each optimizer step records it, from the parameters' own hooks."""
    torch = pytest.importorskip("torch")
    from hvdtrain.bench.counts import Counts, count_torch_optimizer, median_ms
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_step = optimizer.step

    def slow_step(*args, **kwargs):  # stands in for a wait on the allreduces
        time.sleep(0.03)
        return plain_step(*args, **kwargs)
    optimizer.step = slow_step
    counts = Counts()
    count_torch_optimizer(optimizer, counts, horovod=False)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.ones(8, 4)).sum().backward()
        optimizer.step()
    optimizer.step()  # a step with no backward before it is not timed
    assert counts.optimizer_steps == 4
    assert len(counts.tails) == 3
    assert all(0.03 <= t < 1.0 for t in counts.tails)
    assert 30 <= median_ms(counts.tails) < 1000
    assert median_ms([]) is None


def test_ratios_round_by_round_pair_the_runs_of_each_round():
    """On a drifting machine each round's ratio compares launches made side by side;
    the median of those is reported beside the pooled medians' ratio."""
    from hvdtrain.bench import paired_by_round

    def run(impl, round_, rates, ranks=2):
        return {"impl": impl, "placement": "host", "ranks": ranks, "round": round_, "samples_per_s": rates}
    runs = [run("hvdtrain", 0, [100, 110, 90]), run("ddp", 0, [200, 200]),  # a slow round for both
            run("hvdtrain", 1, [500]), run("ddp", 1, [400]),
            run("hvdtrain", 2, [300]), run("ddp", 2, [250]),
            run("hvdtrain", 0, [50], ranks=1), run("ddp", 0, [50], ranks=1)]
    paired = paired_by_round(runs)
    assert set(paired) == {"hvdtrain_vs_ddp"}
    assert paired["hvdtrain_vs_ddp"]["rounds"] == pytest.approx([0.5, 1.25, 1.2])
    assert paired["hvdtrain_vs_ddp"]["median"] == pytest.approx(1.2)
    assert paired_by_round([r for r in runs if r["round"] == 0]) == {}  # one round: nothing to pair
    assert paired_by_round([r for r in runs if r["ranks"] == 1]) == {}
