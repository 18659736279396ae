"""Write ``train_reference_0_1.json`` and ``mlpfield_written_by_0_1.pt`` with cnftools 0.1's flat API.

Run it from a checkout of cnftools 0.1 (main before train_cfm and the fields took grouped options;
the json records the commit), with that checkout's package first on the path:

    cd /path/to/cnftools-0.1 && CNFTOOLS_THREADS=1 python /path/to/make_train_reference.py OUT_DIR

tests/test_training.py::test_grouped_options_reproduce_the_flat_call_bit_for_bit replays each
run with the grouped options and compares every loss, every learning rate and a SHA-256 of the
weights (bit-identical on CPU, float64); tests/test_models.py loads the checkpoint.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

import cnftools
from cnftools.data import eight_gaussians


def digest(module: torch.nn.Module) -> str:
    """SHA-256 of every state_dict entry's name and bytes, in order."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    ref: dict = {"commit": commit.strip(), "torch": torch.__version__}
    # run "labelled": tensor data with labels and every option of the flat call
    torch.manual_seed(0)
    field = cnftools.MLPField(2, hidden=(8,), num_classes=2).double()
    x = torch.randn(24, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = cnftools.train_cfm(
        field,
        cnftools.OTPath(0.05),
        x,
        steps=6,
        batch_size=8,
        lr=1e-2,
        seed=3,
        minibatch_ot=True,
        t_min=0.01,
        t_max=0.99,
        max_grad_norm=0.5,
        lr_schedule="cosine",
        extras={"y": torch.arange(24) % 2},
    )
    ref["labelled"] = {
        "loss": [float(v).hex() for v in result.history["loss"]],
        "lr": [float(v).hex() for v in result.history["lr"]],
        "weights": digest(field),
    }
    # run "sampler": a sampler, an optimizer factory, a float32 field moved by dtype=
    torch.manual_seed(0)
    field = cnftools.MLPField(2, hidden=(8, 8))
    result = cnftools.train_cfm(
        field,
        cnftools.VPPath(),
        eight_gaussians().sample,
        steps=4,
        batch_size=16,
        seed=5,
        t_max=0.999,
        dtype=torch.float64,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )
    ref["sampler"] = {
        "loss": [float(v).hex() for v in result.history["loss"]],
        "lr": [float(v).hex() for v in result.history["lr"]],
        "weights": digest(field),
    }
    # the fields' construction: the same weights from the same seed, the same stored config
    torch.manual_seed(0)
    mlp = cnftools.MLPField(
        2,
        (8,),
        time_embedding="fourier",
        time_features=7,
        time_scale=2.0,
        time_seed=3,
        num_classes=3,
        class_features=4,
        activation="tanh",
        dtype=torch.float64,
    )
    ref["mlp"] = {"config": mlp.config(), "weights": digest(mlp)}
    torch.manual_seed(0)
    conv = cnftools.ConvField(
        1, (4,), time_features=5, time_max_frequency=4.0, cond_dim=2, dtype=torch.float64
    )
    ref["conv"] = {"config": conv.config(), "weights": digest(conv)}
    cnftools.save_checkpoint(out / "mlpfield_written_by_0_1.pt", mlp, cnftools.OTPath(0.1))
    (out / "train_reference_0_1.json").write_text(json.dumps(ref, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
