"""Training, framework-neutral: what every backend's `fit` hands its steps to.

Layers, imports running one way: `contract` (Comm, Steps, Training, Position,
the one horovod_comm), `checkpoint`, `preempt`, `metrics` <- `lr` (the
learning-rate rule), `steer`, `progress`, `curves` <- `preflight`, `resume`,
`validation` <- `epoch_end` (metrics over all ranks, rank-0 checkpoints) <-
`run_dir` (the run directory: prepared, then export and summary) <- `loop`
(the epochs) and `elastic` (the epochs under Horovod's elastic API).
"""
