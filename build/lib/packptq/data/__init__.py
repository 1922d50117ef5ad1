"""Datamodules: embedded (mnist5k, digits), user files (npz), image folders (imagefolder,
imagenet), point clouds (modelnet40, shapes)."""
from packptq.data.base import DATASETS, BaseDataModule, DataConfig, build_datamodule
from packptq.data import embedded, images, npz, points  # noqa: F401  (register the datasets)

__all__ = ["DATASETS", "BaseDataModule", "DataConfig", "build_datamodule"]
