"""Learning to infer: twist objectives and the trainer."""

from .objectives import OBJECTIVES, TwistBatch, get_objective
from .twist_trainer import sample_batch, train_twist

__all__ = ["OBJECTIVES", "TwistBatch", "get_objective", "sample_batch", "train_twist"]
