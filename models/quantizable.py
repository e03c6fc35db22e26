"""Eager-mode QAT-ready MobileNetV3-Large, state-dict compatible with torchvision's quantizable model.

Differences from the float model, as eager-mode quantization requires: QuantStub/DeQuantStub around
the network, FloatFunctional for the residual add and the SE multiply, non-inplace ReLUs, and
`fuse_model(is_qat)` that fuses Conv+BN(+ReLU) and SE's fc1+ReLU. torchvision's
QuantizableSqueezeExcitation is reused (same keys, same forward) with one fix to its loading shim.

The SE gate: the 2021 module that made the published weights (torchvision 0.9) gated with the functional
`F.hardsigmoid`, which eager-mode QAT does not see, so the gate trained in float and its file has no
gate observer. Today's module gates with an `nn.Hardsigmoid` that QAT fake-quantizes with fixed qparams
(scale 1/256). `float_se_gates` gives today's module the 2021 training (models/quantize.py: se_gate);
after int8 conversion the two are the same network (quantized hardsigmoid, output scale 1/256).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules, fuse_modules_qat
from torchvision.models.quantization import mobilenetv3 as tv_quantizable
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from models.mobilenetv3 import InvertedResidual, MobileNetV3


class QuantizableSqueezeExcitation(tv_quantizable.QuantizableSqueezeExcitation):
    """torchvision's, loading 2021 files (module version < 2, or no `_metadata`: no gate observer) right.

    pytorch/vision#4487 (Sep 2021) made the gate an nn.Hardsigmoid (its review: old weights load
    "but the QAT bits ... will be missing"); #4997 added the version-2 shim, which fills a 2021 file's
    missing gate-observer keys with scale 1.0 and zero point 0. Those overwrite the fixed qparams
    (1/256, 0) of the gate's FixedQParamsFakeQuantize: its fake-quant model then gates with 0 or 1 only
    (the int8 conversion drops that observer, so int8 outputs are unaffected). Here the gate observer
    keeps its own values; a gate without an observer (float_se_gates) loads the 2021 file as it is."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        observer = getattr(self.scale_activation, "activation_post_process", None)
        if observer is None:  # nothing to fill; torchvision's shim would add keys whenever qconfig is set
            SqueezeExcitation._load_from_state_dict(self, state_dict, prefix, local_metadata, *args)
            return
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            own = observer.state_dict(prefix=f"{prefix}scale_activation.activation_post_process.")
            for k, v in own.items():
                state_dict.setdefault(k, v)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def float_se_gates(model: nn.Module) -> None:
    """Keep every SE gate out of quantization preparation (call before prepare/prepare_qat): the gate
    trains in float as with the 2021 functional hardsigmoid, and the state dict has no gate observer:
    the 2021 layout, so it is saved as module version 1, as the 2021 file, and torchvision's module
    loads it through its shim."""
    for m in model.modules():
        if isinstance(m, QuantizableSqueezeExcitation):
            m.scale_activation.qconfig = None
            m._version = 1


class QuantizableInvertedResidual(InvertedResidual):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, se_layer=QuantizableSqueezeExcitation, **kwargs)
        self.skip_add = nn.quantized.FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            out = self.block(x)
            if self.stochastic_depth is not None:
                out = self.stochastic_depth(out)
            return self.skip_add.add(x, out)
        return self.block(x)


class QuantizableMobileNetV3(MobileNetV3):
    def __init__(self, variant: str = "large", **kwargs):
        super().__init__(variant, block=QuantizableInvertedResidual, **kwargs)
        self.quant = QuantStub()
        self.dequant = DeQuantStub()
        _replace_relu(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(super().forward(self.quant(x)))

    def fuse_model(self, is_qat: bool = False) -> None:
        fuse = fuse_modules_qat if is_qat else fuse_modules
        for m in self.modules():
            if type(m) is Conv2dNormActivation:
                names = ["0", "1"] + (["2"] if len(m) == 3 and type(m[2]) is nn.ReLU else [])
                fuse(m, names, inplace=True)
            elif type(m) is QuantizableSqueezeExcitation:
                fuse(m, ["fc1", "activation"], inplace=True)


def _replace_relu(module: nn.Module) -> None:
    """Inplace ReLUs cannot be observed by eager-mode quantization: make every one out-of-place."""
    for name, child in module.named_children():
        if type(child) is nn.ReLU:
            setattr(module, name, nn.ReLU(inplace=False))
        else:
            _replace_relu(child)


def quantizable_mobilenet_v3_large(**kwargs) -> QuantizableMobileNetV3:
    return QuantizableMobileNetV3("large", **kwargs)
