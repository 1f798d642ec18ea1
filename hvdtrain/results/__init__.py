"""What a trained run gives back: `predict` (outputs of new inputs) and `evaluate`
(the metrics of a run's model on a split or new data)."""
