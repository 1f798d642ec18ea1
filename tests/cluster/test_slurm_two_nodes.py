"""A 2-node x 1-task job on a real Slurm cluster whose two slurmd "hosts" live in
network namespaces of their own (own address on a veth bridge, own hostname)."""
import json

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.cluster
MLP = ROOT / "examples" / "digits-mlp-torch.yaml"


@pytest.mark.parametrize("mode", ["gloo", "mpi"])
def test_two_nodes_train_to_095(slurm_two_nodes, mode, figure):
    job, status, log = slurm_two_nodes.submit(MLP, f"two-{mode}", "--nodes", "2", "--tasks-per-node", "1",
                                              "--mode", mode)
    assert status == 0, log[-3000:]
    assert slurm_two_nodes.state(job) == "COMPLETED"
    summary = json.loads((slurm_two_nodes.jobs / f"two-{mode}" / "summary.json").read_text())
    assert summary["workers"] == 2 and sorted(summary["hosts"]) == ["node1", "node2"]
    assert summary["final"]["val_accuracy"] >= 0.95
    figure(f"slurm two nodes {mode}: job {job} COMPLETED on {summary['hosts']}, "
          f"accuracy {summary['final']['val_accuracy']:.4f}")
