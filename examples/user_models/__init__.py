"""An example of user code hvdtrain trains: the same residual MLP for both
backends (`torch_models.residual_mlp`, `keras_models.residual_mlp`), named in a
spec as `model: {kind: custom, builder: user_models.torch_models:residual_mlp}`.
The spec file's directory is importable, so this package needs no install."""
