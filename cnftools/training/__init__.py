"""Training: the flow-matching objectives, the fields to train, the loop and checkpoints.

- :mod:`~cnftools.training.objectives`: :func:`cfm_loss`, :func:`fm_loss` (Theorem 2);
- :mod:`~cnftools.training.models`: :class:`MLPField`, :class:`ConvField` (optionally conditional);
- :mod:`~cnftools.training.features`: :class:`TimeFeatures` (a field's time embedding), the
  time-embedding and conditioning modules;
- :mod:`~cnftools.training.loop`: :func:`train_cfm`, :func:`minibatch_ot_pairing`;
- :mod:`~cnftools.training.options`: :func:`train_cfm`'s options, :class:`Batches`,
  :class:`Optimization`, :class:`Monitor`, :class:`Checkpointing`;
- :mod:`~cnftools.training.draws` and :mod:`~cnftools.training.resume`: a run's minibatches and
  its resumable state;
- :mod:`~cnftools.training.checkpoints`: :func:`save_checkpoint`, :func:`load_checkpoint`
  (the file format itself in :mod:`~cnftools.training.checkpoint_format`).
"""

from cnftools.training.checkpoints import (
    Checkpoint,
    describe_path,
    load_checkpoint,
    path_from_description,
    save_checkpoint,
)
from cnftools.training.features import TimeFeatures
from cnftools.training.loop import TrainResult, minibatch_ot_pairing, train_cfm
from cnftools.training.models import ConvField, MLPField
from cnftools.training.objectives import cfm_loss, fm_loss
from cnftools.training.options import Batches, Checkpointing, Monitor, Optimization

__all__ = [
    "Batches",
    "Checkpoint",
    "Checkpointing",
    "ConvField",
    "MLPField",
    "Monitor",
    "Optimization",
    "TimeFeatures",
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
