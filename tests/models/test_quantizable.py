import copy

import torch
from torchvision.models.quantization import mobilenet_v3_large as tv_quant

from models import build


def test_state_dict_matches_torchvision_after_fusion_and_qat_prepare():
    ours, ref = build("quantizable_mobilenet_v3_large"), tv_quant(quantize=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for m in (ours, ref):
        m.eval()
        m.fuse_model(is_qat=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours, ref = build("quantizable_mobilenet_v3_large").train(), tv_quant(quantize=False).train()
    for m in (ours, ref):
        m.fuse_model(is_qat=True)
        m.qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")
        torch.ao.quantization.prepare_qat(m, inplace=True)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(b, strict=True)  # a published QAT state dict loads
    x = torch.randn(2, 3, 64, 64)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_no_inplace_relu_and_float_functional():
    m = build("quantizable_mobilenet_v3_large")
    assert not any(isinstance(x, torch.nn.ReLU) and x.inplace for x in m.modules())
    assert hasattr(m.features[2], "skip_add") and hasattr(m.features[4].block[2], "skip_mul")
    q = copy.deepcopy(m).eval()
    q.fuse_model()
    q.qconfig = torch.ao.quantization.get_default_qconfig("qnnpack")
    torch.backends.quantized.engine = "qnnpack"
    torch.ao.quantization.prepare(q, inplace=True)
    q(torch.randn(2, 3, 64, 64))
    torch.ao.quantization.convert(q, inplace=True)
    assert q(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
