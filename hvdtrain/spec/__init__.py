"""The job spec: YAML -> typed, validated `JobSpec`. One place: the sections'
models (`sections`), the job and its loading (`job`)."""
from __future__ import annotations

from .job import (JobSpec, load_spec, reference_problems, path_problems, read_yaml, apply_override, validate,
                  describe, user_path, valid_keys, model_from_dict, dump)
from .sections import (NonNegativeInt, Activation, SKLEARN_DATASETS, REGRESSION_DATASETS, ImportPath, LOSSES,
                       DEFAULT_LOSS, Section, Width, Seed, MLPSpec, CNNSpec, CustomModelSpec, ModelSpec,
                       EntrySpec, SyntheticSpec, CleanSpec, IMAGE_SUFFIXES, IMAGE_KINDS, IMAGE_SOURCES,
                       LAZY_SOURCES, DataSpec, OptimizerSpec, METRICS, EarlyStoppingSpec, TargetSpec,
                       TrainSpec, SlurmSpec, LogSpec, MlflowSpec, ElasticSpec, HorovodSpec, CheckpointSpec, ResourcesSpec)

__all__ = ['Activation', 'CNNSpec', 'CheckpointSpec', 'CleanSpec', 'CustomModelSpec', 'DEFAULT_LOSS',
           'DataSpec', 'EarlyStoppingSpec', 'ElasticSpec', 'EntrySpec', 'HorovodSpec', 'IMAGE_KINDS',
           'IMAGE_SOURCES', 'IMAGE_SUFFIXES', 'ImportPath', 'JobSpec', 'LAZY_SOURCES', 'LOSSES', 'LogSpec',
           'METRICS', 'MLPSpec', 'MlflowSpec', 'ModelSpec', 'NonNegativeInt', 'OptimizerSpec', 'REGRESSION_DATASETS',
           'ResourcesSpec', 'SKLEARN_DATASETS', 'Section', 'Seed', 'SlurmSpec', 'SyntheticSpec', 'TargetSpec',
           'TrainSpec', 'Width', 'apply_override', 'describe', 'dump', 'load_spec', 'model_from_dict',
           'path_problems', 'read_yaml', 'reference_problems', 'user_path', 'valid_keys', 'validate']
