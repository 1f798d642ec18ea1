"""The job spec: YAML -> typed, validated `JobSpec`. One place: the sections'
models (`base` <- `data_section` <- `sections`), the job and its loading (`job`)."""
from __future__ import annotations

from .job import (JobSpec, load_spec, reference_problems, path_problems, read_yaml, apply_override, validate,
                  describe, user_path, valid_keys, model_from_dict, dump, is_transformers)
from .base import NonNegativeInt, ImportPath, Section, Width, Seed
from .data_section import (SyntheticSpec, CleanSpec, IMAGE_SUFFIXES, IMAGE_KINDS, IMAGE_SOURCES, LAZY_SOURCES,
                           TEXT_SUFFIXES, TokenizerSpec, DataSpec)
from .sections import (Activation, SKLEARN_DATASETS, REGRESSION_DATASETS, LOSSES, DEFAULT_LOSS, MLPSpec, CNNSpec,
                       CustomModelSpec, ModelSpec, EntrySpec, OptimizerSpec, METRICS, EarlyStoppingSpec, TargetSpec,
                       TrainSpec, SlurmSpec, LogSpec, MlflowSpec, ElasticSpec, HorovodSpec, CheckpointSpec, ResourcesSpec)

__all__ = ['Activation', 'CNNSpec', 'CheckpointSpec', 'CleanSpec', 'CustomModelSpec', 'DEFAULT_LOSS',
           'DataSpec', 'EarlyStoppingSpec', 'ElasticSpec', 'EntrySpec', 'HorovodSpec', 'IMAGE_KINDS',
           'IMAGE_SOURCES', 'IMAGE_SUFFIXES', 'ImportPath', 'JobSpec', 'LAZY_SOURCES', 'LOSSES', 'LogSpec',
           'METRICS', 'MLPSpec', 'MlflowSpec', 'ModelSpec', 'NonNegativeInt', 'OptimizerSpec', 'REGRESSION_DATASETS',
           'ResourcesSpec', 'SKLEARN_DATASETS', 'Section', 'Seed', 'SlurmSpec', 'SyntheticSpec', 'TEXT_SUFFIXES', 'TargetSpec', 'TokenizerSpec',
           'TrainSpec', 'Width', 'apply_override', 'describe', 'dump', 'is_transformers', 'load_spec', 'model_from_dict',
           'path_problems', 'read_yaml', 'reference_problems', 'user_path', 'valid_keys', 'validate']
