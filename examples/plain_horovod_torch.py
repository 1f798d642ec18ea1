"""A plain Horovod training script, written the way Horovod's own examples are
(init, pin, scale the lr, DistributedOptimizer, broadcast, rank-0 output). It
knows nothing of hvdtrain; examples/plain-horovod-torch.yaml runs it on every
launcher hvdtrain renders:

    hvdtrain run examples/plain-horovod-torch.yaml -np 2
    python examples/plain_horovod_torch.py --epochs 1     # also runs alone, as 1 rank
"""
import argparse
import hashlib
import json
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", help="rank 0 writes the final accuracy and every rank's weights digest here")
    args = parser.parse_args()

    # Horovod: initialise, and pin a GPU to each local rank (if there are any).
    hvd.init()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
    device = torch.device("cuda", hvd.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    train = TensorDataset(x_train, y_train)
    # Horovod: each rank reads its own part of the data.
    sampler = DistributedSampler(train, num_replicas=hvd.size(), rank=hvd.rank(), seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    # Horovod: scale the learning rate by the number of workers, wrap the optimizer.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    # Horovod: start every rank from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = (model(x_val.to(device)).argmax(1).cpu() == y_val).float().mean()
        # Horovod: average the metric over the ranks.
        accuracy = hvd.allreduce(correct, name="accuracy").item()
        if hvd.rank() == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, validation accuracy {accuracy:.4f}", flush=True)

    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    digests = hvd.allgather_object(digest)
    if hvd.rank() == 0 and args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"accuracy": accuracy, "ranks": hvd.size(), "digests": digests}))


if __name__ == "__main__":
    main()
