import math

import pytest
import torch
from torchvision.transforms import v2 as T

from data.classification import (BatchTransform, ClassificationDataConfig, EpochSampler, ImageFolder,
                                 TrainTransform, eval_transform)


def _cfg(root, **kw):
    base = dict(root=str(root), batch_size=8, workers=0, crop_size=64, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                interpolation="bilinear", hflip=0.5, auto_augment="imagenet", auto_augment_interpolation="nearest",
                random_erasing=0.2, val_resize=73, val_crop=64)
    return ClassificationDataConfig(**{**base, **kw})


def test_per_sample_seeding_independent_of_order_and_worker(toy_data):
    cfg = _cfg(toy_data / "imagenet")
    ds = ImageFolder(toy_data / "imagenet/train", TrainTransform(cfg), seed=5, train=True)
    a = ds[(3, 17)]
    torch.rand(100)  # disturbing the global RNG changes nothing
    ds[(3, 18)]
    b = ds[(3, 17)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    c = ds[(4, 17)]  # another epoch: another augmentation
    assert not torch.equal(a[0], c[0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, sampler=[(3, 17), (3, 18), (3, 19), (3, 20)])
    assert torch.equal(next(iter(loader))[0][0], a[0])


def test_erasing_draw_matches_torchvision_distribution():
    """Same generator state -> the same box as torchvision's RandomErasing on the normalized tensor."""
    cfg = _cfg("unused", random_erasing=1.0)
    tf = TrainTransform(cfg)
    for seed in range(50):
        img = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8)
        torch.manual_seed(seed)
        box = tf.erase_box(img)
        torch.manual_seed(seed)
        ref = T.RandomErasing(p=1.0, scale=cfg.erasing_scale, ratio=cfg.erasing_ratio, value=0)(
            torch.ones(3, 64, 64))
        ours = BatchTransform((0, 0, 0), (1 / 255, 1 / 255, 1 / 255), False)(torch.ones(1, 64, 64, 3,
                                                                                       dtype=torch.uint8), box[None])
        assert torch.equal(ours[0], ref), seed


def test_batch_transform_normalizes_like_reference():
    imgs = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)  # the loader's (N, H, W, 3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = BatchTransform(mean, std, channels_last=True)(imgs)
    ref = T.Normalize(mean, std)(imgs.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    erased = BatchTransform((0, 0, 0), (1, 1, 1), False)(torch.full((2, 8, 8, 3), 255, dtype=torch.uint8),
                                                        torch.tensor([[1, 2, 3, 2, 4], [0, 0, 0, 8, 8]]))
    assert (erased[0] == 0).sum() == 3 * 8 and (erased[1] == 0).sum() == 0
    assert erased[0, :, 2, 3].eq(0).all() and erased[0, :, 4, 3].eq(1).all()


def test_eval_sampler_shards_without_duplicates():
    shards = [list(EpochSampler(10, r, 3, 0, train=False)) for r in range(3)]
    indices = sorted(i for s in shards for _, i in s)
    assert indices == list(range(10))
    train = [list(EpochSampler(10, r, 3, 0, train=True)) for r in range(3)]
    assert len({len(s) for s in train}) == 1 and math.ceil(10 / 3) == len(train[0])
    s = EpochSampler(10, 0, 1, 0, train=True)
    s.set_epoch(1)
    first = [i for _, i in s]
    s.set_epoch(2)
    assert first != [i for _, i in s] and all(e == 2 for e, _ in s)


def test_eval_transform_sizes(toy_data):
    cfg = _cfg(toy_data / "imagenet")
    ds = ImageFolder(toy_data / "imagenet/val", eval_transform(cfg), seed=0, train=False)
    img, target = ds[(0, 0)]
    assert img.shape == (64, 64, 3) and img.dtype == torch.uint8 and target == 0


@pytest.mark.parametrize("val_resize,val_crop", [(73, 64), (256, 224)])
def test_eval_transform_pixels_match_resize_then_center_crop(toy_data, val_resize, val_crop):
    """Validation pixels of real toy JPEGs (shorter side 64-320 px, up- and downscaled) through the
    dataset: equal to torchvision's v2 Resize(val_resize, bilinear, antialias) + CenterCrop(val_crop)
    on the PIL-decoded image, and within one grey level of PIL's own bilinear resize + a center crop
    computed here (shorter side -> val_resize, offsets round((size - crop) / 2))."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    cfg = _cfg(toy_data / "imagenet", val_resize=val_resize, val_crop=val_crop)
    ds = ImageFolder(toy_data / "imagenet/val", eval_transform(cfg), seed=0, train=False)
    ref_tf = T.Compose([T.Resize(val_resize, interpolation=InterpolationMode.BILINEAR, antialias=True),
                        T.CenterCrop(val_crop)])
    for index in range(0, len(ds), 17):
        img, target = ds[(0, index)]
        path, label = ds.samples[index]
        assert target == label and img.shape == (val_crop, val_crop, 3) and img.dtype == torch.uint8
        pil = Image.open(path).convert("RGB")
        ref = ref_tf(T.PILToTensor()(pil)).permute(1, 2, 0)
        assert torch.equal(img, ref), path
        w, h = pil.size
        nw, nh = (val_resize, int(val_resize * h / w)) if w <= h else (int(val_resize * w / h), val_resize)
        top, left = round((nh - val_crop) / 2), round((nw - val_crop) / 2)
        by_pil = torch.from_numpy(np.array(pil.resize((nw, nh), Image.BILINEAR)
                                           .crop((left, top, left + val_crop, top + val_crop))))
        diff = (img.int() - by_pil.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.05, (path, diff.max(), diff.float().mean())
        assert img.float().std() > 10  # a real picture, not a flat patch


def test_same_draws_as_the_reference_pil_pipeline(toy_data):
    """For one generator state, ours picks the reference's crop, flip and AutoAugment policy: the
    images differ only by the resize implementations (torch's uint8 antialias vs PIL's)."""
    from PIL import Image
    from torchvision import transforms as V1
    from torchvision.transforms import InterpolationMode

    from data.classification import decode

    cfg = _cfg(toy_data / "imagenet", crop_size=96, random_erasing=0.0)
    ours = TrainTransform(cfg)
    ref = V1.Compose([V1.RandomResizedCrop(96, scale=cfg.scale, ratio=cfg.ratio), V1.RandomHorizontalFlip(),
                      V1.AutoAugment(V1.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.NEAREST),
                      V1.PILToTensor()])
    files = sorted((toy_data / "imagenet/train").rglob("*.jpg"))[::40]
    diffs = []
    for seed, f in enumerate(files):
        torch.manual_seed(seed)
        a = ours.augment(decode(str(f))).permute(2, 0, 1).float()
        torch.manual_seed(seed)
        b = ref(Image.open(f).convert("RGB")).float()
        diffs.append((a - b).abs().mean().item())
    # measured: <= 0.02 grey levels mean difference; a different crop/flip/op would differ by tens
    assert max(diffs) < 0.5, diffs


# ----------------------------------------------------------------------------- bad files


def test_file_names_that_are_not_utf8_are_read_in_loader_workers(toy_data, tmp_path):
    """Linux allows any bytes in a name; Python keeps the ones that are not UTF-8 as surrogate escapes,
    which torchvision's read_file refused (and a worker's error then lost the path)."""
    import os
    import shutil

    from data.classification import decode

    split = tmp_path / "val"
    shutil.copytree(toy_data / "imagenet/val/n00000000_circle", split / "n00000000_circle")
    src = split / "n00000000_circle/circle_val_0000.jpg"
    odd = os.fsdecode(bytes(split / "n00000000_circle") + b"/circ\xffle.jpg")
    os.rename(src, odd)
    ds = ImageFolder(split, eval_transform(_cfg(split.parent)), seed=0, train=False)
    assert odd in [p for p, _ in ds.samples]
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), num_workers=1,
                                         sampler=[(0, i) for i in range(len(ds))])
    images, _ = next(iter(loader))
    expected = decode(str(toy_data / "imagenet/val/n00000000_circle/circle_val_0000.jpg"))
    assert torch.equal(images[[p for p, _ in ds.samples].index(odd)], ds.transform(expected))


def test_an_animated_gif_is_refused_naming_the_file(tmp_path):
    from PIL import Image

    from data.classification import DataError, decode

    frames = [Image.new("RGB", (30, 20), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "still.gif")
    frames[0].save(tmp_path / "moving.jpg", format="GIF", save_all=True, append_images=frames[1:])
    assert decode(str(tmp_path / "still.gif")).shape == (3, 20, 30)
    with pytest.raises(DataError) as err:
        decode(str(tmp_path / "moving.jpg"))
    assert str(err.value) == (f"{tmp_path / 'moving.jpg'}: an animated GIF of 3 frames; expected a still "
                              "image (save one frame as a JPEG or PNG)")
