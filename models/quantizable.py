"""Eager-mode QAT-ready MobileNetV3-Large, state-dict compatible with torchvision's quantizable model.

Differences from the float model, as eager-mode quantization requires: QuantStub/DeQuantStub around
the network, FloatFunctional for the residual add and the SE multiply, non-inplace ReLUs, and
`fuse_model(is_qat)` that fuses Conv+BN(+ReLU) and SE's fc1+ReLU. torchvision's
QuantizableSqueezeExcitation is reused as is (same keys, same version-2 loading shim).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules, fuse_modules_qat
from torchvision.models.quantization.mobilenetv3 import QuantizableSqueezeExcitation
from torchvision.ops.misc import Conv2dNormActivation

from models.mobilenetv3 import InvertedResidual, MobileNetV3


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
