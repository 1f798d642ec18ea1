"""The build's fixes to horovod.torch, run inside each of 2 ranks by horovodrun
(see test_ranks.py). CHANNELS_LAST_FIXES: allreduce and broadcast take
channels-last tensors (outputs keep the input's layout); the collectives that
split or join along the first dimension still refuse them. BLOCKING_WAIT_FIXES:
a rank waiting in synchronize() sleeps instead of spinning a core."""
import os
import time
from pathlib import Path

import horovod.torch as hvd
import pytest
import torch
from torch import nn

os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"  # a timeline started and stopped by a test
hvd.init()
CL = torch.channels_last


def rank_tensor(seed_offset=0):
    """A different 4-d tensor on each rank, in channels-last order."""
    generator = torch.Generator().manual_seed(hvd.rank() + seed_offset)
    return torch.randn(2, 3, 4, 5, generator=generator).contiguous(memory_format=CL)


def mean_over_ranks(seed_offset=0):
    return sum(torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(r + seed_offset))
               for r in range(hvd.size())) / hvd.size()


def test_allreduce_of_a_channels_last_tensor_is_the_elementwise_mean():
    tensor = rank_tensor()
    assert not tensor.is_contiguous()
    out = hvd.allreduce(tensor, name="cl.allreduce")
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, mean_over_ranks())
    hvd.allreduce_(tensor, name="cl.allreduce_")
    torch.testing.assert_close(tensor, mean_over_ranks())


def test_grouped_allreduce_of_channels_last_tensors():
    first, second = rank_tensor(), rank_tensor(10)
    outs = hvd.grouped_allreduce([first, second], name="cl.grouped")
    torch.testing.assert_close(outs[0], mean_over_ranks())
    torch.testing.assert_close(outs[1], mean_over_ranks(10))


def test_broadcast_of_a_channels_last_tensor_gives_rank_0s_values():
    tensor = rank_tensor()
    expected = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hvd.broadcast(tensor, root_rank=0, name="cl.broadcast"), expected)
    hvd.broadcast_(tensor, root_rank=0, name="cl.broadcast_")
    torch.testing.assert_close(tensor, expected)


def test_allgather_still_refuses_a_channels_last_tensor():
    with pytest.raises(ValueError, match="contiguous"):
        hvd.allgather(rank_tensor(), name="cl.allgather")


def test_a_strided_tensor_later_in_a_group_is_refused():
    strided = torch.zeros(4, 6)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        hvd.grouped_allreduce([torch.zeros(3), strided], name="cl.strided")


def model(channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return net.to(memory_format=CL) if channels_last else net


def trained(channels_last: bool) -> list[torch.Tensor]:
    """Three DistributedOptimizer steps on rank-specific batches."""
    net = model(channels_last)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                         named_parameters=net.named_parameters())
    hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    generator = torch.Generator().manual_seed(100 + hvd.rank())
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, generator=generator)
        y = torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x.contiguous(memory_format=CL) if channels_last else x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


def test_distributed_optimizer_trains_a_channels_last_model_as_a_default_layout_one():
    plain, last = trained(False), trained(True)
    assert not last[0].is_contiguous()  # the conv weight really is channels-last
    for a, b in zip(plain, last):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gathered = hvd.allgather_object([p.contiguous() for p in last], name="cl.weights")
    for a, b in zip(*gathered):
        assert torch.equal(a, b)  # every rank holds the same weights


def test_a_rank_waiting_for_its_peer_sleeps_instead_of_spinning():
    """Rank 0 starts an allreduce, says so in a file and waits for it in synchronize();
    rank 1 joins only after it has seen the file and a further second has passed, so
    rank 0 waits at least that second whatever the machine's load. Rank 0's main thread
    uses a small part of the wait's wall time (the spinning wait used all of it)."""
    out = Path(os.environ["HVDTRAIN_TEST_OUT"])
    waiting = out / "rank0.waiting"
    hvd.allreduce(torch.zeros(1), name="wait.warmup")
    if hvd.rank() == 0:
        wall, cpu = time.perf_counter(), time.thread_time()
        handle = hvd.allreduce_async(torch.ones(1), name="wait.late")
        waiting.write_text("waiting\n")
        hvd.synchronize(handle)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        assert wall >= 1.0, wall  # it did wait for rank 1
        assert cpu < 0.2 * wall, (cpu, wall)
    else:
        deadline = time.monotonic() + 120
        while not waiting.is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.0)  # the wait measured on rank 0: at least this long
        hvd.allreduce(torch.ones(1), name="wait.late")
        assert waiting.is_file()


def test_an_idle_rank_does_not_negotiate_every_cycle_time():
    """IDLE_WAIT_FIXES: with no collective outstanding, the background thread sleeps until
    one is enqueued (or IDLE_WAIT_MS passes) instead of negotiating an empty cycle every
    cycle time (1 ms: about a thousand in the second below). Cycles marked in rank 0's
    timeline; the collectives around the pause still complete."""
    from hvdtrain.horovod_build.fixes import IDLE_WAIT_MS
    timeline = Path(os.environ["HVDTRAIN_TEST_OUT"]) / "idle-timeline.json"
    assert os.environ.get("HOROVOD_CYCLE_TIME", "1") == "1"
    hvd.start_timeline(str(timeline), mark_cycles=True)
    torch.testing.assert_close(hvd.allreduce(torch.ones(2), name="idle.before"), torch.ones(2))
    time.sleep(1.0)
    torch.testing.assert_close(hvd.allreduce(torch.ones(2), name="idle.after"), torch.ones(2))
    hvd.stop_timeline()
    if hvd.rank() == 0:
        cycles = timeline.read_text().count('"CYCLE_START"')
        # about one wake-up per IDLE_WAIT_MS (50 in the second), far from a thousand; at
        # least a few: shutdown and the stall check still run while idle
        assert 5 <= cycles <= 3 * 1000 / IDLE_WAIT_MS, cycles


def test_gradients_in_buckets_are_the_per_gradient_averages():
    """hvdtrain's buckets (grouped allreduces started from the backward pass, each closed by
    the parameter that brings it to its cap, a larger one alone) train as Horovod's per-gradient allreduces do; a frozen parameter stays out."""
    from hvdtrain.backends.torch import buckets

    def steps(bucket_mb: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(600, 500), nn.ReLU(), nn.Linear(500, 300), nn.ReLU(), nn.Linear(300, 3))
        net[0].bias.requires_grad_(False)
        groups = buckets(list(net.parameters()), bucket_mb)
        optimizer = hvd.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                                             named_parameters=net.named_parameters(), groups=groups)
        generator = torch.Generator().manual_seed(200 + hvd.rank())
        for _ in range(3):
            optimizer.zero_grad()
            x, y = torch.randn(8, 600, generator=generator), torch.randint(0, 3, (8,), generator=generator)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        return groups, [p.detach().clone() for p in net.parameters()]

    (none, per_gradient), (groups, bucketed) = steps(0), steps(2)
    assert none is None and [len(g) for g in groups] == [4, 1]  # 605 KB under the first 1 MiB; 1.2 MB alone
    for a, b in zip(per_gradient, bucketed):
        torch.testing.assert_close(a, b)
    gathered = hvd.allgather_object(bucketed, name="buckets.weights")
    assert all(torch.equal(a, b) for a, b in zip(*gathered))
