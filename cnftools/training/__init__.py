"""Training: the flow-matching objectives, the fields to train, the loop and checkpoints.

- :mod:`~cnftools.training.objectives`: :func:`cfm_loss`, :func:`fm_loss` (Theorem 2);
- :mod:`~cnftools.training.models`: :class:`MLPField`, :class:`ConvField` (optionally conditional);
- :mod:`~cnftools.training.loop`: :func:`train_cfm`, :func:`minibatch_ot_pairing`;
- :mod:`~cnftools.training.checkpoints`: :func:`save_checkpoint`, :func:`load_checkpoint`.
"""

from cnftools.training.checkpoints import (
    Checkpoint,
    describe_path,
    load_checkpoint,
    path_from_description,
    save_checkpoint,
)
from cnftools.training.loop import TrainResult, minibatch_ot_pairing, train_cfm
from cnftools.training.models import ConvField, MLPField
from cnftools.training.objectives import cfm_loss, fm_loss

__all__ = [
    "Checkpoint",
    "ConvField",
    "MLPField",
    "TrainResult",
    "cfm_loss",
    "describe_path",
    "fm_loss",
    "load_checkpoint",
    "minibatch_ot_pairing",
    "path_from_description",
    "save_checkpoint",
    "train_cfm",
]
