"""Datamodules: embedded (mnist5k, digits), user files (npz), image folders, point clouds."""
from packptq.data.base import DATASETS, BaseDataModule, DataConfig, build_datamodule
from packptq.data import embedded  # noqa: F401  (registers mnist5k, digits)

__all__ = ["DATASETS", "BaseDataModule", "DataConfig", "build_datamodule"]
