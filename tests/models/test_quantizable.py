import copy

import torch
from torchvision.models.quantization import mobilenet_v3_large as tv_quant

from models import build
from tests.oracle import assert_close, randomize


def _pair(seed=0):
    """Ours and torchvision's quantizable model with the same random weights and BN statistics."""
    ours, ref = build("quantizable_mobilenet_v3_large"), tv_quant(quantize=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    randomize(ref, seed, inputs=X)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _same_outputs(ours, ref, what, seed=0):
    for mode in ("eval", "train"):
        ours.train(mode == "train"), ref.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(seed)
            out_a = ours(X)
            torch.manual_seed(seed)
            assert_close(out_a, ref(X), msg=f"{what}, {mode}")
    ours.eval(), ref.eval()


def test_float_model_matches_torchvision():
    ours, ref = _pair()
    _same_outputs(ours, ref, "float")
    a, b = ours.state_dict(), ref.state_dict()  # the train-mode pass updated BN statistics alike
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_dict_matches_torchvision_after_fusion_and_qat_prepare():
    ours, ref = _pair()
    with torch.no_grad():
        float_out = ref.eval()(X)
    for m in (ours, ref):
        m.eval()
        m.fuse_model(is_qat=False)
    assert list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():  # fused eval model: same numbers, and still the float model's function
        assert_close(ours(X), ref(X), msg="fused")
        assert_close(ours(X), float_out, rtol=1e-3, msg="fused vs unfused")
    ours, ref = _pair()
    ours.train(), ref.train()
    for m in (ours, ref):
        m.fuse_model(is_qat=True)
        m.qconfig = torch.ao.quantization.get_default_qat_qconfig("qnnpack")
        torch.ao.quantization.prepare_qat(m, inplace=True)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(ref.state_dict(), strict=True)  # a published QAT state dict loads
    # train mode (observers update, fake-quant, BN batch statistics), then eval mode
    _same_outputs(ours, ref, "QAT")
    a, b = ours.state_dict(), ref.state_dict()  # observer ranges, scales and BN statistics agree
    for k in a:
        assert torch.equal(a[k], b[k]), k


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


def test_int8_model_matches_torchvision_after_calibration():
    """Post-training int8 conversion (qnnpack) of the same random float model, calibrated on the same
    images: the int8 logits equal torchvision's."""
    torch.backends.quantized.engine = "qnnpack"
    ours, ref = _pair()
    for m in (ours, ref):
        m.eval()
        m.fuse_model()
        m.qconfig = torch.ao.quantization.get_default_qconfig("qnnpack")
        torch.ao.quantization.prepare(m, inplace=True)
        with torch.no_grad():
            m(X)
        torch.ao.quantization.convert(m, inplace=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x), ref(x), msg="int8")
