"""BatchNorm's running statistics on 2 ranks that see different data: at the end of
every epoch each rank's statistics are averaged over the ranks. The model
(probes.batchnorm_first) normalises the inputs themselves with momentum 1, so the
statistics a rank computed alone are those of its last batch of the epoch, known
here from the data; each epoch's checkpoint must hold their mean over the ranks
(broadcasting rank 0's, or averaging only at the end of training, fails)."""
import io

import numpy as np
import pytest
import yaml

from hvdtrain.train import checkpoint
from hvdtrain.data import load_dataset, shard_batches
from hvdtrain.spec import load_spec
from tests.conftest import ROOT, require_module

pytestmark = pytest.mark.distributed
USER_CODE = ROOT / "tests" / "data" / "user_code"
BUILDERS = {"torch": "probes:batchnorm_first", "tensorflow": "probes_keras:batchnorm_first"}


def running_stats(backend: str, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    if backend == "torch":
        import torch
        state = torch.load(io.BytesIO(payload), weights_only=True)["model"]
        return state["1.running_mean"].numpy(), state["1.running_var"].numpy()
    with np.load(io.BytesIO(payload)) as saved:  # Keras: gamma, beta, moving mean, moving variance
        return saved["model/2"], saved["model/3"]


@pytest.mark.parametrize("backend", BUILDERS)
def test_running_statistics_are_the_mean_over_the_ranks_after_every_epoch(cli, tmp_path, backend, figure):
    require_module("tensorflow" if backend == "tensorflow" else "torch")
    spec = yaml.safe_load((ROOT / "examples" / "digits-mlp-torch.yaml").read_text())
    epochs = 3
    spec.update(backend=backend, model={"kind": "custom", "builder": BUILDERS[backend]}, code=[str(USER_CODE)],
                checkpoint={"every_epochs": 1, "keep_last": epochs}, output=str(tmp_path / "run"))
    spec["train"]["epochs"] = epochs
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = cli("run", tmp_path / "spec.yaml", "-np", "2")
    assert result.returncode == 0, result.stderr[-3000:]

    loaded = load_spec(tmp_path / "spec.yaml")
    train = load_dataset(loaded.data).train
    saved = {c.epoch: c for c in map(checkpoint.load, checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints"))}
    assert sorted(saved) == list(range(1, epochs + 1))
    ddof = 1 if backend == "torch" else 0  # torch keeps the unbiased batch variance, Keras the biased one
    for epoch in range(epochs):
        last = [train.batch(shard_batches(len(train), rank, 2, loaded.train.batch_size, loaded.train.seed,
                                          epoch)[-1])[0].reshape(-1, 64).astype(np.float64) for rank in (0, 1)]
        means, variances = [x.mean(0) for x in last], [x.var(0, ddof=ddof) for x in last]
        assert np.abs(means[0] - means[1]).max() > 0.3  # the ranks' own statistics differ
        mean, var = running_stats(backend, saved[epoch + 1].payload)
        np.testing.assert_allclose(mean, (means[0] + means[1]) / 2, atol=2e-5)
        np.testing.assert_allclose(var, (variances[0] + variances[1]) / 2, rtol=1e-4, atol=2e-5)
    figure(f"BatchNorm {backend}: each of {epochs} epochs' checkpoint holds the mean of the 2 ranks' own "
           f"statistics (they differed by up to {np.abs(means[0] - means[1]).max():.2f})")
