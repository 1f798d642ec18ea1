"""probes.batchnorm_first as a Keras model."""

import keras


def batchnorm_first(input_shape, num_classes):
    """BatchNormalization on the inputs themselves, with momentum 0: after each training
    step its moving mean and variance are those of that step's batch of inputs."""
    inputs = keras.Input(shape=tuple(input_shape))
    x = keras.layers.BatchNormalization(momentum=0.0)(keras.layers.Flatten()(inputs))
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="batchnorm_first")
