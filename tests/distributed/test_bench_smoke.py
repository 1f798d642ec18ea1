"""A short run of `hvdtrain bench` (few steps): the report has every field and
every figure is positive. The full benchmark is run by hand (benchmarks/)."""
import json
from collections import defaultdict

import numpy as np
import pytest

from tests.conftest import ROOT, require_module

pytestmark = pytest.mark.distributed


def test_bench_smoke_run_writes_a_complete_report(cli, tmp_path):
    result = cli("bench", ROOT / "examples" / "digits-mlp-torch.yaml", "--rounds", "1", "--steps", "3",
                 "--warmup", "1", "--sizes", "4K,1M", "-o", tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"date", "machine", "versions", "settings", "throughput", "allreduce", "figures"} <= set(report)
    assert {(t["impl"], t["ranks"]) for t in report["throughput"]} == \
        {(i, r) for i in ("hvdtrain", "horovod", "ddp", "tensorflow", "local") for r in (1, 2)}
    assert report["failures"] == []
    for t in report["throughput"]:
        assert 0 < t["min"] <= t["median"] <= t["max"]
    impls = {r["impl"] for r in report["allreduce"]}
    assert {"horovod-gloo", "torch-gloo", "memcpy"} <= impls
    assert all(r["seconds"] > 0 and r["busbw"] > 0 for r in report["allreduce"])
    figures = report["figures"]
    assert figures["hvdtrain_vs_horovod"] > 0 and figures["horovod_vs_ddp"] > 0
    assert all(v > 0 for v in figures["scaling_efficiency"].values())
    assert "hvdtrain_vs_horovod" in result.stdout  # the terminal table


def test_profile_writes_each_torch_launchs_table_and_trace(cli, tmp_path):
    """--profile: torch.profiler over the last window of every torch launch, on rank 0."""
    result = cli("bench", ROOT / "examples" / "digits-mlp-torch.yaml", "--ranks", "2", "--impls", "horovod,ddp",
                 "--rounds", "1", "--steps", "3", "--warmup", "1", "--sizes", "none", "--profile", "-o", tmp_path,
                 timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for impl in ("horovod", "ddp"):
        table = (tmp_path / "profile" / f"{impl}-2-1" / f"{impl}-host.txt").read_text()
        assert "Optimizer.step" in table and "Self CPU time total" in table, table
        assert json.loads((tmp_path / "profile" / f"{impl}-2-1" / f"{impl}-host.json").read_text())["traceEvents"]


def allreduce_gaps(timeline: str, steps: int = 20) -> list[int]:
    """The times (us) between one tensor's successive allreduces, for each tensor that
    was allreduced at least `steps` times (the gradients), from Horovod's Chrome trace.
    A tensor's next allreduce waits for its last one's result, so each runs in a later
    background cycle than the one before: a load on the machine only lengthens them."""
    events = json.loads(timeline)
    tensors = {e["pid"]: e["args"]["name"] for e in events
               if e.get("name") == "process_name" and "name" in e.get("args", {})}
    starts = defaultdict(list)
    for event in events:
        if event.get("ph") == "B" and event.get("name") == "GLOO_ALLREDUCE":
            starts[tensors[event["pid"]]].append(event["ts"])
    return [gap for ts in starts.values() if len(ts) >= steps for gap in np.diff(sorted(ts))]


def test_horovod_knobs_take_effect_in_the_ranks(cli, tmp_path, figure):
    """Horovod's own timeline shows the spec's knobs at work: with a fusion threshold the
    gradients go through the fusion buffer (with 0 they do not), and with a 50 ms cycle
    time a gradient's allreduces are at least about 50 ms apart (a bound that a load on the
    machine cannot break; with the default cycle time they are ~20 ms apart here)."""
    runs = {}
    for name, knobs in {"fused": ["horovod.fusion_threshold_mb=8", "horovod.cycle_time_ms=50"],
                        "unfused": ["horovod.fusion_threshold_mb=0"]}.items():
        timeline = tmp_path / f"{name}.json"
        extra = ["horovod.autotune=true", f"horovod.autotune_log={tmp_path / 'autotune.csv'}"] \
            if name == "fused" else []
        result = cli("run", ROOT / "examples" / "digits-mlp-torch.yaml", "-np", "2", "train.epochs=1",
                     f"output={tmp_path / name}", f"horovod.timeline={timeline}", *knobs, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = timeline.read_text()
        assert runs[name].lstrip().startswith("[") and "ALLREDUCE" in runs[name]  # Horovod's Chrome trace
    assert "MEMCPY_IN_FUSION_BUFFER" in runs["fused"] and "MEMCPY_IN_FUSION_BUFFER" not in runs["unfused"]
    gaps = allreduce_gaps(runs["fused"])
    assert len(gaps) >= 20 and np.median(gaps) >= 40_000, sorted(gaps)[:10]
    figure(f"a gradient's allreduces apart (median): {np.median(gaps) / 1000:.1f} ms with cycle_time_ms 50, "
           f"{np.median(allreduce_gaps(runs['unfused'])) / 1000:.1f} ms with the default (no bound: the "
           "steps set it)")
    assert (tmp_path / "autotune.csv").read_text().startswith("hierarchical_allreduce,")  # autotuner's CSV
    spec = (tmp_path / "fused" / "spec.yaml").read_text()
    assert "fusion_threshold_mb: 8.0" in spec and "cycle_time_ms: 50.0" in spec  # recorded with the run


def test_input_bench_smoke_run_measures_three_sources_and_peak_rss(cli, tmp_path):
    import yaml
    spec = yaml.safe_load((ROOT / "examples" / "synthetic-cnn-torch.yaml").read_text())
    spec["data"]["synthetic"] = {"samples": 256, "shape": [3, 8, 8], "classes": 4}
    spec["model"]["hidden"] = [16]
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(spec))
    result = cli("bench", tmp_path / "small.yaml", "--input", "--rounds", "1", "--epochs", "2",
                 "--data-sizes", "0.01,0.02", "--ranks", "2", "-o", tmp_path / "report", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "input.json").read_text())
    assert (tmp_path / "report" / "input.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["source"] for r in report["throughput"]} == {"memory", "image_folder", "npy"}
    assert all(r["samples_per_s"] > 0 for r in report["throughput"])
    assert [m["data_gib"] for m in report["memory"]] == [0.01, 0.02]
    assert all(m["peak_rss_mb"] > 0 and m["samples"] > 0 for m in report["memory"])
    assert report["figures"]["image_folder_vs_memory"] > 0 and "x in-memory" in result.stdout


@pytest.mark.parametrize("impl", ["hvdtrain", "horovod", "ddp"])
def test_each_implementation_counts_the_samples_its_ranks_processed(impl, tmp_path):
    """One window of 23 steps on 2 ranks is one epoch of the digits: every one of the 1438
    samples, and 34 of them again to fill the last step (train.last_batch pad): 23 x 32 x 2,
    counted by the workers."""
    import subprocess

    from hvdtrain.bench import env, launcher
    from hvdtrain.data import load_dataset
    from hvdtrain.spec import load_spec
    spec = ROOT / "examples" / "digits-mlp-torch.yaml"
    out = tmp_path / "window.json"
    result = subprocess.run([*launcher(impl, 2), "train", impl, str(spec), str(out), "--windows", "1",
                             "--steps", "23", "--warmup", "0"], capture_output=True, text=True, env=env(),
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert len(load_dataset(load_spec(spec).data).train) == 1438
    assert report["window_samples"] == [23 * 32 * 2]


@pytest.mark.parametrize("settings", [
    ["optimizer.momentum=0.9", "optimizer.weight_decay=0.001", "horovod.fp16_compression=true",
     "horovod.backward_passes_per_step=2"],
    ["optimizer.name=adam", "optimizer.weight_decay=0.01"]], ids=["sgd-fp16-passes2", "adam"])
def test_every_implementation_does_the_same_work(settings, tmp_path):
    """Per window, counted by the workers: the same samples and optimizer steps in every
    implementation, the spec's optimizer (as overridden, the way `hvdtrain bench SPEC
    key=value` passes it on) in each, and gradients communicated by all but `local`."""
    import subprocess

    import yaml

    from hvdtrain.bench import env, launcher
    path = ROOT / "examples" / "digits-mlp-torch.yaml"
    spec = yaml.safe_load(path.read_text())
    for setting in settings:
        key, value = setting.split("=")
        section, name = key.split(".")
        spec.setdefault(section, {})[name] = yaml.safe_load(value)
    reports = {}
    for impl in ("hvdtrain", "horovod", "ddp", "local"):
        out = tmp_path / f"{impl}.json"
        result = subprocess.run([*launcher(impl, 2), "train", impl, str(path), str(out),
                                 "--windows", "2", "--steps", "6", "--warmup", "2",
                                 *(f"--set={setting}" for setting in settings)],
                                capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        reports[impl] = json.loads(out.read_text())
    passes = spec["horovod"].get("backward_passes_per_step", 1)
    for impl, report in reports.items():
        assert report["window_samples"] == reports["hvdtrain"]["window_samples"], impl
        assert report["window_optimizer_steps"] == [6 // passes] * 2, impl
        optimizer = report["optimizer"]
        assert optimizer["name"].lower() == spec["optimizer"].get("name", "sgd"), impl
        assert optimizer["weight_decay"] == spec["optimizer"]["weight_decay"], impl
        assert optimizer["lr"] == pytest.approx(spec["optimizer"]["lr"] * 2), impl  # scaled by 2 ranks
        if spec["optimizer"].get("name", "sgd") == "sgd":
            assert optimizer["momentum"] == spec["optimizer"]["momentum"], impl
        communicated = [a > 0 for a in report["window_allreduces"]]
        assert communicated == [impl != "local"] * 2, impl


@pytest.mark.parametrize("impl", ["hvdtrain", "local"])
def test_compiled_steps_are_counted_and_not_recompiled_after_warm_up(impl, tmp_path):
    """train.compile: hvdtrain compiles its model; the plain PyTorch reference (local)
    its whole step as users write it (forward and loss with their backward, then the
    optimizer's update: two graphs at least). The workers count the graphs torch.compile
    made during the warm-up and after it: with batches of one shape, none after."""
    import subprocess

    from hvdtrain.bench import env, launcher
    out = tmp_path / "window.json"
    result = subprocess.run([*launcher(impl, 1), "train", impl, str(ROOT / "examples" / "digits-mlp-torch.yaml"),
                             str(out), "--windows", "2", "--steps", "5", "--warmup", "3", "--set=train.compile=true"],
                            capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["graphs_compiled_in_warmup"] >= (2 if impl == "local" else 1)
    assert report["graphs_compiled_after_warmup"] == 0
    assert report["window_optimizer_steps"] == [5, 5]


def test_a_language_model_is_benched_against_the_plain_loop(tmp_path):
    """A GPT-2 config on the docstrings (benchmarks/gpt2-gpu.yaml, made small for a CPU):
    hvdtrain's loop and the plain PyTorch loop (its next-token loss) do the same work."""
    import subprocess

    from benchmarks.docstrings import write
    from hvdtrain.bench import env, launcher
    require_module("transformers")
    write(tmp_path / "docs.jsonl")
    settings = [f"data.path={tmp_path / 'docs.jsonl'}", "resources.gpus_per_worker=0", "train.precision=fp32",
                "train.batch_size=4", "model.args.n_layer=1", "model.args.n_embd=32", "model.args.n_head=2",
                "data.tokenizer.vocab_size=500", "data.tokenizer.max_length=32", "model.args.n_positions=32"]
    reports = {}
    for impl in ("hvdtrain", "local"):
        out = tmp_path / f"{impl}.json"
        result = subprocess.run([*launcher(impl, 1), "train", impl, str(ROOT / "benchmarks" / "gpt2-gpu.yaml"),
                                 str(out), "--windows", "1", "--steps", "3", "--warmup", "1",
                                 *(f"--set={setting}" for setting in settings)],
                                capture_output=True, text=True, env=dict(env(), HVDTRAIN_CACHE=str(tmp_path)),
                                timeout=600, cwd=ROOT)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        reports[impl] = json.loads(out.read_text())
    assert reports["hvdtrain"]["window_samples"] == reports["local"]["window_samples"] == [3 * 4]
    assert reports["hvdtrain"]["window_optimizer_steps"] == reports["local"]["window_optimizer_steps"] == [3]
