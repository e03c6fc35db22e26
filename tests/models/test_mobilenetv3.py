import itertools

import pytest
import torch
import torchvision

from models import MODELS, build, count_mult_adds
from models.mobilenetv3 import LARGE, TABLES, MobileNetV3, resolve
from tests.oracle import assert_close, randomize

TV = {"mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
      "mobilenet_v3_small": torchvision.models.mobilenet_v3_small}


OPTIONS = list(itertools.product((0.5, 0.75, 1.0, 1.25), (False, True), (False, True)))


@pytest.mark.parametrize("name", sorted(TV))
def test_matches_torchvision_for_every_option(name):
    """Same keys and shapes as torchvision for every width/reduced_tail/dilated; then, at random
    weights and BatchNorm statistics (the same state in both), the same logits in eval mode, and in
    train mode (batch statistics, dropout with the same RNG) the same logits and the same updated
    running statistics (BN momentum)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for seed, (width, reduced_tail, dilated) in enumerate(OPTIONS):
        where = f"{name} width {width} reduced_tail {reduced_tail} dilated {dilated}"
        ours = build(name, width_mult=width, reduced_tail=reduced_tail, dilated=dilated).eval()
        ref = TV[name](width_mult=width, reduced_tail=reduced_tail, dilated=dilated).eval()
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b), where
        assert all(a[k].shape == b[k].shape for k in a), where
        assert all(c.out_channels % 8 == 0 for c in ours.modules() if isinstance(c, torch.nn.Conv2d))
        randomize(ref, seed, inputs=x)
        ours.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad():
            assert_close(ours(x), ref(x), msg=f"{where}, eval")
            ours.train(), ref.train()
            torch.manual_seed(seed)
            out_ours = ours(x)
            torch.manual_seed(seed)
            assert_close(out_ours, ref(x), msg=f"{where}, train")
        b = ref.state_dict()
        for k, v in ours.state_dict().items():
            if k.endswith(("running_mean", "running_var")):
                assert_close(v, b[k], min_scale=1e-4, msg=f"{where}, {k} after a train step")


@pytest.mark.parametrize("name", sorted(TV))
def test_table_rows_match_torchvision_config(name):
    """Every row (kernel, expansion, output, SE, activation, stride, dilation) of the resolved table
    equals torchvision's config for every option: block 4 of Small is hswish, etc."""
    from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

    for width, reduced_tail, dilated in OPTIONS:
        ours = resolve(TABLES[name.removeprefix("mobilenet_v3_")], width, reduced_tail, dilated)
        ref, last = _mobilenet_v3_conf(name, width_mult=width, reduced_tail=reduced_tail, dilated=dilated)
        assert len(ours) == len(ref)
        for i, (o, r) in enumerate(zip(ours, ref), start=1):
            got = (o.inp, o.kernel, o.expanded, o.out, o.se, o.act, o.stride, o.dilation)
            want = (r.input_channels, r.kernel, r.expanded_channels, r.out_channels, r.use_se,
                    "hswish" if r.use_hs else "relu", r.stride, r.dilation)
            assert got == want, f"{name} block{i}, width {width}, reduced_tail {reduced_tail}, dilated {dilated}"
        m = build(name, width_mult=width, reduced_tail=reduced_tail)
        assert m.classifier[0].out_features == last


@pytest.mark.parametrize("name,params,gflops", [("mobilenet_v3_large", 5_483_032, 0.217),
                                                ("mobilenet_v3_small", 2_542_856, 0.057)])
def test_published_params_and_mult_adds(name, params, gflops):
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert round(count_mult_adds(model, torch.randn(1, 3, 224, 224)) / 1e9, 3) == gflops


def test_architecture_details_from_the_blog():
    m = build("mobilenet_v3_large")
    first = m.features[1].block
    assert len(first) == 2  # expanded == input: no expansion conv, projection still there
    assert first[-1][0].kernel_size == (1, 1) and len(first[-1]) == 2  # projection: conv + BN, no activation
    se_block = m.features[4].block
    assert isinstance(se_block[1][2], torch.nn.ReLU) and se_block[2].__class__.__name__ == "SqueezeExcitation"
    assert m.features[-1].out_channels == 6 * m.features[-2].out_channels
    assert isinstance(m.classifier[2], torch.nn.Dropout) and isinstance(m.classifier[3], torch.nn.Linear)
    bn = m.features[0][1]
    assert bn.eps == 0.001 and bn.momentum == 0.01
    assert m.stage_names == ["stem", "block2", "block4", "block7", "block13", "last_conv"]
    assert len(LARGE) == 15


def test_stochastic_depth_rates_and_eval_identity():
    torch.manual_seed(0)
    m = MobileNetV3("large", stochastic_depth=0.2)
    residual = [(i, b) for i, b in enumerate(m.features[1:-1], start=1) if b.use_res_connect]
    for i, b in residual:  # linear in depth, reaching the configured value at the last block
        assert b.stochastic_depth.p == pytest.approx(0.2 * i / 15)
    block = m.features[15]  # p = 0.2
    block.train()
    x = torch.randn(4000, block.out_channels, 1, 1)
    with torch.no_grad():
        branch = block.block.eval()(x)  # BN in eval so the branch is deterministic
        block.block.train(False)
        out = block(x)
    dropped = ((out - x).flatten(1).abs().sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.03  # binomial sd ~0.006
    kept = (out - x).flatten(1).abs().sum(1) != 0
    torch.testing.assert_close((out - x)[kept], branch[kept] / 0.8)
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), branch + x)


def test_registry_errors_list_names():
    with pytest.raises(KeyError) as err:
        build("mobilenet_v3_medium")
    for name in MODELS:
        assert name in str(err.value)
