"""The residual MLP of torch_models.py as a Keras 3 model, with a custom layer.

The layer is registered with Keras, so the exported model.keras loads back
(hvdtrain imports this module before loading it)."""
import keras


@keras.saving.register_keras_serializable(package="user_models")
class ResidualBlock(keras.layers.Layer):
    """x + Dense(ReLU(Dense(x))): a block whose output has its input's width."""

    def __init__(self, width: int, dropout: float, **kwargs):
        super().__init__(**kwargs)
        self.width, self.dropout = width, dropout
        self.inner = keras.layers.Dense(width, activation="relu")
        self.drop = keras.layers.Dropout(dropout)
        self.outer = keras.layers.Dense(width)

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.outer.build((*input_shape[:-1], self.width))

    def call(self, x, training=None):
        return x + self.outer(self.drop(self.inner(x), training=training))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "dropout": self.dropout}


def residual_mlp(input_shape, num_classes, width=64, blocks=2, dropout=0.1):
    """hvdtrain passes input_shape (one sample's shape; images channels-last) and
    num_classes (the outputs)."""
    inputs = keras.Input(shape=tuple(input_shape))
    x = keras.layers.Dense(width, activation="relu")(keras.layers.Flatten()(inputs))
    for _ in range(blocks):
        x = ResidualBlock(width, dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="residual_mlp")
