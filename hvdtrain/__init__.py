"""hvdtrain: Horovod-backed training jobs from one YAML spec.

Importing hvdtrain imports neither torch nor tensorflow; backends load their
framework when a job asks for it.
"""
__version__ = "0.1.0"
