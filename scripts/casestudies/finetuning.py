"""Pretrained backbones with a new head, for the fine-tuning study (diabetic retinopathy)."""
from __future__ import annotations

from pathlib import Path

import torch

from conceptmon.checkpoints import CheckpointError, load_state_dict

from . import TrainingError


def pretrained_state(arch: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The backbone weights asked for (``imagenet``, a state_dict file), or None for ``none``."""
    if weights == "none":
        return None
    if weights == "imagenet":
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(arch)
        except ValueError:
            raise TrainingError(f"--weights imagenet: torchvision has no pretrained weights for {arch!r}; "
                                f"pass a state_dict file instead") from None
        try:
            return enum.DEFAULT.get_state_dict(progress=True, check_hash=True)
        except OSError as e:  # URLError and socket errors are OSErrors
            raise TrainingError(
                f"--weights imagenet: could not download {enum.DEFAULT.url} ({e}); run once on a machine "
                f"with internet (it caches under ~/.cache/torch/hub) or pass --weights PATH"
            ) from None
    path = Path(weights)
    if not path.exists():
        raise TrainingError(f"--weights: {path} not found; pass imagenet, none or a state_dict file")
    try:
        return load_state_dict(path)
    except CheckpointError as e:
        raise TrainingError(f"--weights: {e}") from None


def load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy every weight whose name and shape fit; return the names left at their fresh init."""
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < len(own) // 2:
        raise TrainingError(
            f"--weights {source}: only {len(fitting)} of {len(own)} tensors fit the model; is --arch right?"
        )
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))


def head_names(fresh: list[str]) -> set[str]:
    """Modules of the parameters left fresh (the new head): what --freeze-backbone keeps training."""
    return {n.rsplit(".", 1)[0] for n in fresh}


def freeze_backbone(model: torch.nn.Module, fresh: list[str]) -> None:
    """Train only the modules whose parameters ``load_backbone`` left fresh."""
    if not fresh:
        raise TrainingError("--freeze-backbone: nothing would train (no new head); drop --freeze-backbone "
                            "or use pretrained --weights")
    heads = head_names(fresh)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[0] in heads)
