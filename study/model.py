"""ResNet18 for grayscale thigh slices, with optional ImageNet weights and partial freezing.

Usage::

    from study.model import build_model, seed_everything, trainable_parameters

    seed_everything(0)
    model = build_model(weights="imagenet", freeze="layer4")   # layer4 + fc train
    logits = model(x)            # x: float32 (n, 1, H, W) in [0, 1] (study.data.to_model_input)

The seed abstract tuned "the weights of the last network layer" of an ImageNet ResNet18;
``freeze="fc"`` reproduces that, the other modes let the ablations ask how much deeper
fine-tuning adds.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from study.resnet18 import IMAGENET1K_V1_URL, resnet18

WEIGHTS_CHOICES = ("none", "imagenet", "<path to a .pth state dict>")

# Which top-level resnet18 children train under each freeze mode; everything else is frozen.
TRAINABLE_BY_FREEZE: dict[str, tuple[str, ...]] = {
    "fc": ("fc",),
    "layer4": ("layer4", "fc"),
    "layer3": ("layer3", "layer4", "fc"),
    "none": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"),
}

# torchvision's ImageNet preprocessing constants (ResNet18_Weights.IMAGENET1K_V1.transforms()).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Seconds to wait on download.pytorch.org before giving up: offline machines fail at DNS at
# once, but a black-holed network would otherwise hang for minutes.
DOWNLOAD_TIMEOUT_S = 10.0


class ThighResNet(nn.Module):
    """resnet18 (torchvision's, study/resnet18.py) that takes one-channel slices in [0, 1].

    The grayscale input is repeated to 3 channels and normalised with the ImageNet mean/std
    because ImageNet conv1 filters were learned on 3 normalised colour channels; doing the same
    without pretrained weights costs nothing and keeps every weights mode on one input contract.

    Frozen parts (see ``TRAINABLE_BY_FREEZE``) have ``requires_grad=False`` and their BatchNorm
    layers stay in eval mode after ``model.train()``, so their running statistics are the
    pretrained ones and do not drift on thigh images.

    Attributes:
        backbone: the torchvision resnet18 with ``fc`` = Linear(512, num_classes).
        freeze: the freeze mode it was built with.
        trainable: names of the backbone children that train.
    """

    def __init__(self, backbone: nn.Module, *, freeze: str = "none") -> None:
        super().__init__()
        if freeze not in TRAINABLE_BY_FREEZE:
            raise ValueError(
                f"Invalid freeze {freeze!r}. Only {', '.join(TRAINABLE_BY_FREEZE)} are supported."
            )
        self.backbone = backbone
        self.freeze = freeze
        self.trainable = TRAINABLE_BY_FREEZE[freeze]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        for name, child in self.backbone.named_children():
            child.requires_grad_(name in self.trainable)

    def frozen_modules(self) -> list[nn.Module]:
        """Backbone children that do not train under this freeze mode."""
        return [c for n, c in self.backbone.named_children() if n not in self.trainable]

    def train(self, mode: bool = True) -> ThighResNet:
        super().train(mode)
        if mode:
            for child in self.frozen_modules():
                for m in child.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"ThighResNet expects (n, 1, H, W) input, got shape {tuple(x.shape)}")
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.backbone(x)


def imagenet_cache_file() -> Path:
    """Where torch.hub looks for the ImageNet resnet18 file (honours $TORCH_HOME)."""
    url = IMAGENET1K_V1_URL
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    path = imagenet_cache_file()
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    url = IMAGENET1K_V1_URL
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(path.parent), map_location="cpu", progress=False
        )
    except Exception as err:  # any network / disk failure gets the same instructions
        raise RuntimeError(
            f"ImageNet resnet18 weights are not cached at {path} and downloading {url} failed "
            f"({type(err).__name__}: {err}). On an offline machine, copy {path.name} into "
            f"{path.parent}/ (set $TORCH_HOME to change that folder), or pass "
            f"weights: /path/to/{path.name}."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def _load_path_weights(model: ThighResNet, path: Path) -> None:
    """Load a ThighResNet state dict, or a plain torchvision resnet18 one (fc kept if it fits)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} does not exist; weights must be one of {WEIGHTS_CHOICES}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled modules, truncated files, non-torch files
        raise ValueError(
            f"weights file {str(path)!r} is not a loadable state dict ({type(err).__name__}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
    if any(k.startswith("backbone.") for k in state):
        target, state = model, {k: v for k, v in state.items() if k not in ("mean", "std")}
        strict_skip: set[str] = {"mean", "std"}
    else:
        target, strict_skip = model.backbone, set()
        fc_shape = model.backbone.fc.weight.shape
        if "fc.weight" in state and state["fc.weight"].shape != fc_shape:
            # an ImageNet classifier head (1000 classes): keep our freshly initialised fc
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            strict_skip = {"fc.weight", "fc.bias"}
    expected = set(target.state_dict())
    missing = sorted(expected - set(state) - strict_skip)
    unexpected = sorted(set(state) - expected)
    mismatched = sorted(
        k for k in set(state) & expected if tuple(state[k].shape) != tuple(target.state_dict()[k].shape)
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights file {str(path)!r} does not match resnet18: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}, {len(mismatched)} shape mismatches {mismatched[:5]}"
        )
    target.load_state_dict(state, strict=False)


def build_model(*, weights: str = "none", freeze: str = "none", num_classes: int = 2) -> ThighResNet:
    """Build a ResNet18 classifier for (n, 1, H, W) slices in [0, 1].

    Args:
        weights: "none" (random init), "imagenet" (torchvision IMAGENET1K_V1, from the hub
            cache or downloaded), or a path to a .pth state dict: either a saved ThighResNet
            (keys ``backbone.*``) or a torchvision resnet18 (an fc of another size is skipped).
        freeze: "fc" (only fc trains), "layer4" (layer4 + fc), "layer3" (layer3 + layer4 + fc)
            or "none" (everything trains).
        num_classes: outputs of the final Linear(512, num_classes).

    Returns:
        A ThighResNet with the frozen parts' requires_grad False.

    Raises:
        ValueError: unknown freeze, or a weights file whose keys/shapes don't fit.
        FileNotFoundError: weights is a path that does not exist.
        RuntimeError: weights="imagenet" but the file is neither cached nor downloadable.
    """
    if freeze not in TRAINABLE_BY_FREEZE:
        raise ValueError(
            f"Invalid freeze {freeze!r}. Only {', '.join(TRAINABLE_BY_FREEZE)} are supported."
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    backbone = resnet18()  # torchvision's resnet18(weights=None), without importing torchvision (study/resnet18.py)
    if weights == "imagenet":
        backbone.load_state_dict(_imagenet_state_dict())
    backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
    model = ThighResNet(backbone, freeze=freeze)
    if weights not in ("none", "imagenet"):
        _load_path_weights(model, Path(weights).expanduser())
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that the optimiser should update (requires_grad True)."""
    return [p for p in model.parameters() if p.requires_grad]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch and force deterministic kernels.

    On CPU (fixed thread count) this makes training bit-reproducible per seed; on CUDA it also
    pins cuDNN to deterministic algorithms and sets the cuBLAS workspace that determinism needs.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    use_tf32(False)
    # warn_only: an op without a deterministic kernel should warn, not kill a long Tune trial
    torch.use_deterministic_algorithms(True, warn_only=True)


def use_tf32(on: bool) -> None:
    """Let CUDA matmuls and cuDNN convolutions round float32 inputs to TF32 (on) or not (off).

    Off is the default here (seed_everything turns it off): torch enables TF32 for cuDNN
    convolutions by default, which changes a ResNet's outputs at the 1e-3 level, so features
    cached during the trials and the final test pass would not run on the same numbers. The
    feature cache's key records what was in force (fp32_precision).
    """
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def fp32_precision(device: str | torch.device) -> str:
    """How float32 math runs on device: "fp32", or "tf32" on CUDA while TF32 is allowed."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 else "fp32"
