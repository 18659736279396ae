"""scikit-learn's 8×8 handwritten digits as integer data (nothing is downloaded).

1797 rows of 64 integers in ``0..16`` (:data:`DIGITS_LEVELS` = 17 levels), read from the file
shipped inside the optional dependency ``scikit-learn``. Users import these from
:mod:`cnftools.data`, which re-exports them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DIGITS_LEVELS", "load_digit_labels", "load_digits"]

DIGITS_LEVELS = 17
"""Number of grey levels of scikit-learn's digits (values ``0..16``)."""


def _sklearn_digits(caller: str) -> object:
    """scikit-learn's digits bunch (read from the file inside scikit-learn; no download)."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{caller} needs the optional dependency scikit-learn: pip install scikit-learn"
        ) from error
    return sklearn_load_digits()


def load_digits(*, images: bool = False, device: torch.device | str | None = None) -> Tensor:
    """scikit-learn's 8×8 digits as integers ``0..16``: shape ``(1797, 64)`` (or ``(1797, 1, 8, 8)``).

    Reads the file shipped inside scikit-learn (no download). Labels are not returned.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    data = torch.as_tensor(_sklearn_digits("load_digits").data).round().to(torch.long)
    if images:
        data = data.reshape(-1, 1, 8, 8)
    return data.to(device) if device is not None else data


def load_digit_labels(*, device: torch.device | str | None = None) -> Tensor:
    """The class labels ``0..9`` of :func:`load_digits`' rows, in the same order: shape ``(1797,)``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    labels = torch.as_tensor(_sklearn_digits("load_digit_labels").target).to(torch.long)
    return labels.to(device) if device is not None else labels
