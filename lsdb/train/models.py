"""Model registry: small BatchNorm-free networks for loss-landscape studies, and the CIFAR
ResNet-20 (BatchNorm, residual connections) that Fort et al. 2020 study.

Every model maps a batch of inputs shaped ``(N, *input_shape)`` to logits ``(N, C)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsdb.errors import SpecError
from lsdb.train import factories
from lsdb.train.quantum import QPatchNet


# Models that list their layers: ``prepare(x)`` reshapes the input, ``steps()`` names the modules the
# forward pass applies in order (by their state-dict prefix). The forward pass is exactly that loop,
# so code that needs the layer structure (weight matching, the probes' fused CPU evaluator) reads
# it from ``steps()`` instead of guessing.

def _named(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    return [(f"{prefix}.{i}", m) for i, m in enumerate(seq)]


def _run_steps(self, x):
    h = self.prepare(x)
    for _, module in self.steps():
        h = module(h)
    return h


PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten)


def plain_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``model.steps()`` when the model lists its layers and every one is a plain convolution (zero
    padding), linear layer, ReLU or flatten, so code can apply them from the weights alone (the
    probes' fused CPU evaluator, the cached linearisation, weight matching); else None."""
    if not (hasattr(model, "steps") and hasattr(model, "prepare")):
        return None
    steps = model.steps()
    for _, m in steps:
        if type(m) not in PLAIN_LAYERS:
            return None
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return None
    return steps


class CNN1d(nn.Module):
    """Stride-2 Conv1d layers with ReLU, then a linear read-out (the MNIST-1D default: 3 layers of
    32 channels, kernels 5/3/3, about 8k parameters)."""

    def __init__(self, input_shape, num_classes, width=32, kernels=(5, 3, 3)):
        super().__init__()
        channels, length = _as_1d(input_shape)
        layers = []
        for k in kernels:
            layers += [nn.Conv1d(channels, width, k, stride=2, padding=k // 2), nn.ReLU()]
            channels, length = width, (length + 2 * (k // 2) - k) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.readout = nn.Linear(channels * length, num_classes)
        self.input_shape = tuple(input_shape)

    def prepare(self, x):
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 2 else x
        return x.unsqueeze(1) if x.dim() == 2 else x

    def steps(self):
        return [*_named("features", self.features), ("flatten", self.flatten), ("readout", self.readout)]

    forward = _run_steps


class CNN2d(nn.Module):
    """Stride-2 Conv2d layers (3×3) with ReLU, then a linear read-out."""

    def __init__(self, input_shape, num_classes, width=32, depth=2):
        super().__init__()
        if len(input_shape) != 3:
            raise SpecError(f"model cnn2d needs image inputs (C, H, W), got shape {tuple(input_shape)}")
        channels, h, w = input_shape
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels, h, w = width, (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.readout = nn.Linear(channels * h * w, num_classes)

    def prepare(self, x):
        return x

    def steps(self):
        return [*_named("features", self.features), ("flatten", self.flatten), ("readout", self.readout)]

    forward = _run_steps


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with ReLU."""

    def __init__(self, input_shape, num_classes, width=128, depth=2):
        super().__init__()
        d = math.prod(input_shape)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def prepare(self, x):
        return x.flatten(1)

    def steps(self):
        return _named("net", self.net)

    forward = _run_steps


class PatchNet(nn.Module):
    """Kawase et al. 2025 style: ``patches`` overlapping windows of the (1D) input, one small MLP per
    patch, logits averaged. Each patch spans half the signal; windows are spread evenly."""

    def __init__(self, input_shape, num_classes, width=16, patches=4, depth=1):
        super().__init__()
        channels, length = _as_1d(input_shape)
        self.span = max(2, length // 2) if patches > 1 else length
        self.starts = [round(i * (length - self.span) / max(1, patches - 1)) for i in range(patches)]
        self.heads = nn.ModuleList(MLP((channels, self.span), num_classes, width, depth) for _ in range(patches))

    def forward(self, x):
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        outs = [h(x[..., s : s + self.span]) for h, s in zip(self.heads, self.starts)]
        return torch.stack(outs).mean(0)


class _PadShortcut(nn.Module):
    """He et al.'s option-A shortcut where a stage changes shape: the input subsampled with the
    block's stride, its channels zero-padded (at the end) to ``out_channels``. No parameters."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU (He et al. 2016, Fig. 2)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        changes = stride != 1 or in_channels != channels
        self.shortcut = _PadShortcut(stride, channels - in_channels) if changes else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (§4.2): a 3×3 conv of ``width`` channels with BatchNorm,
    three stages of ``depth`` basic blocks with ``width``, 2·``width`` and 4·``width`` channels
    (the first block of stages 2 and 3 halves the spatial size with stride 2), global average
    pooling, a linear read-out; 6·depth + 2 layers. width = 16 and depth = 3 is the paper's
    ResNet-20 (0.27 M parameters on CIFAR-10); width scales every stage. Shortcuts are option A
    (identity, subsampled and zero-padded where the shape changes: no parameters), as in the paper's
    CIFAR experiments. Any (C, H, W) input works; stride-2 stages round odd sizes up.

    It does not list its layers (``steps``): the residual additions are not a chain, so the fast
    paths that need one (the fused evaluator, the cached linearisation, weight matching) do not
    apply, and the probes take their general paths."""

    def __init__(self, input_shape, num_classes, width=16, depth=3):
        super().__init__()
        if len(input_shape) != 3:
            raise SpecError(f"model resnet20 needs image inputs (C, H, W), got shape {tuple(input_shape)}")
        self.conv = nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, channels = [], width
        for i in range(3):
            out = width * 2**i
            blocks = [BasicBlock(channels if j == 0 else out, out, 2 if i > 0 and j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.readout = nn.Linear(channels, num_classes)
        for m in self.modules():  # He et al. 2015 initialisation, as the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        h = self.stages(torch.relu(self.bn(self.conv(x))))
        return self.readout(h.mean(dim=(2, 3)))


def _as_1d(input_shape):
    if len(input_shape) == 1:
        return 1, input_shape[0]
    return math.prod(input_shape[:-1]), input_shape[-1]


MODELS = {
    "cnn1d": lambda m, shape, c: CNN1d(shape, c, m.width, m.kernels),
    "cnn2d": lambda m, shape, c: CNN2d(shape, c, m.width, m.depth),
    "mlp": lambda m, shape, c: MLP(shape, c, m.width, m.depth),
    "patchnet": lambda m, shape, c: PatchNet(shape, c, m.width, m.patches, m.depth),
    # width is the qubits per patch (at most 8), depth the circuit layers (lsdb.train.quantum)
    "qpatchnet": lambda m, shape, c: QPatchNet(shape, c, qubits=m.width, patches=m.patches, layers=m.depth),
    # width is the first stage's channels (16 in the paper; the spec's default 32 doubles every
    # stage), depth the blocks per stage (3 in ResNet-20)
    "resnet20": lambda m, shape, c: ResNet20(shape, c, m.width, m.depth),
}


def build_model(model_spec, input_shape, num_classes, seed: int | None = None) -> nn.Module:
    """Build the model ``model_spec`` (an ``lsdb.spec.ModelSpec``) names, or its factory makes;
    seed its init if given."""
    if not model_spec.factory and model_spec.name not in MODELS:
        raise SpecError(f"unknown model '{model_spec.name}'; valid models: {', '.join(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    if not model_spec.factory:
        return MODELS[model_spec.name](model_spec, tuple(input_shape), num_classes)
    model = factories.call(model_spec.factory, "model", tuple(input_shape), num_classes, **dict(model_spec.kwargs))
    if not isinstance(model, nn.Module):
        raise SpecError(f"model factory {model_spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise SpecError(f"model factory {model_spec.factory} returned a module without parameters")
    return model


def check_fits(model: nn.Module, state: dict, what: str) -> None:
    """Raise ``SpecError`` naming the first key or shape of ``state`` that ``model`` does not have
    (a checkpoint of another architecture, or a factory that changed since it was saved)."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise SpecError(f"{what} does not fit the spec's model: it has no {key} (the model's {tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise SpecError(f"{what} does not fit the spec's model: {key} is {tuple(state[key].shape)}, "
                            f"the model's is {tuple(value.shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise SpecError(f"{what} does not fit the spec's model: the model has no {extra[0]}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
