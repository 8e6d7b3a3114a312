"""Writes the insightface golden files: what arcface_torch's own backbone code computes.

Run with insightface's ``recognition/arcface_torch/backbones`` folder (a checkout of
https://github.com/deepinsight/insightface, outside this repository) on the path::

    python tests/golden/insightface/make_golden.py PATH/TO/insightface/recognition/arcface_torch/backbones

For each arcface_torch backbone it builds insightface's model, fills every tensor of its state dict by
``filled`` of tests/support/insightface_weights.py (a rule keyed by the tensor's name, so that the test rebuilds
the same weights without insightface's code), and records the state dict's names and shapes and the model's
eval-mode output on fixed inputs (``inputs``) in ``expected.json``. Nothing of insightface's code is copied here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))

from insightface_weights import filled, inputs  # noqa: E402

MODELS = {"r18": ("iresnet18", 512), "r50": ("iresnet50", 512), "r100": ("iresnet100", 512),
          "r200": ("iresnet200", 512), "mbf": ("mobilefacenet", 512), "r18-128": ("iresnet18", 128)}
"""arcface_torch's ``get_model`` name (and ``num_features``) -> the project's backbone name."""
OUTPUTS = ("r18", "r50", "r100", "mbf", "r18-128")
"""The models whose outputs are recorded (r200's names and shapes only: its forward is slow on a CPU)."""


def main(backbones: Path) -> None:
    sys.path.insert(0, str(backbones.parent))
    from backbones import get_model

    torch.set_grad_enabled(False)
    expected = {"insightface_commit": sys.argv[2] if len(sys.argv) > 2 else "", "models": {}}
    for key, (project_name, features) in MODELS.items():
        model = get_model(key.split("-")[0], num_features=features, fp16=False).eval()
        state = filled(model.state_dict())
        model.load_state_dict(state)
        record = {"backbone": project_name, "embedding_size": features,
                  "state_dict": [[name, list(tensor.shape)] for name, tensor in state.items()]}
        if key in OUTPUTS:
            record["outputs"] = model(inputs()).double().tolist()
        expected["models"][key] = record
    (HERE / "expected.json").write_text(json.dumps(expected) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
