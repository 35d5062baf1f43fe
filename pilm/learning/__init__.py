"""Learning to infer: twist objectives and trainer; fine-tuning objectives and trainer; the
one training loop they share (``fit``) and what each trainer returns (``Trained``)."""

from .fit import Checkpointing, Trained, fit
from .objectives import FINETUNE_OBJECTIVES, OBJECTIVES, PolicyBatch, TwistBatch, get_objective
from .policy_trainer import finetune
from .prm_trainer import train_prm
from .skip_trainer import SkipModel, train_skip_model
from .twist_trainer import sample_batch, train_twist

__all__ = ["FINETUNE_OBJECTIVES", "OBJECTIVES", "Checkpointing", "PolicyBatch", "SkipModel", "Trained", "TwistBatch",
           "finetune", "fit", "get_objective", "sample_batch", "train_prm", "train_skip_model", "train_twist"]
