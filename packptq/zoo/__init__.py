"""Model zoo: builders, checkpoint loading and block discovery."""
from packptq.zoo import families, graph, pointnet  # noqa: F401  (register split rules and the PointNet builder)
from packptq.zoo.split import SPLIT_RULES, Split, SplitError, check_split, split_model

__all__ = ["SPLIT_RULES", "Split", "SplitError", "check_split", "split_model"]
