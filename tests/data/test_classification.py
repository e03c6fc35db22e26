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


def _pil_preset(path, val_resize, val_crop):
    """The oracle, computed here with PIL alone: what torchvision's reference evaluation preset
    (ClassificationPresetEval, PIL backend) feeds the model: PIL open + convert("RGB"), bilinear resize of
    the shorter side to val_resize (the longer side int(val_resize * long / short)), center crop at
    offsets int(round((size - crop) / 2))."""
    import numpy as np
    from PIL import Image

    with open(path, "rb") as fh:
        pil = Image.open(fh).convert("RGB")
    w, h = pil.size
    nw, nh = (val_resize, int(val_resize * h / w)) if w <= h else (int(val_resize * w / h), val_resize)
    top, left = int(round((nh - val_crop) / 2.0)), int(round((nw - val_crop) / 2.0))
    resized = pil.resize((nw, nh), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(resized.crop((left, top, left + val_crop, top + val_crop))))


@pytest.mark.parametrize("val_resize,val_crop", [(73, 64), (256, 224)])
def test_eval_input_is_the_reference_preset_value_for_value(toy_data, photos, val_resize, val_crop):
    """Validation items equal, in every value, PIL's resize + center crop computed here (the input the
    published accuracies were measured on): on the natural photographs (69-500 px, up- and downscaled)
    and on toy JPEGs; and equal torchvision's own preset transforms on the same PIL image."""
    from PIL import Image
    from torchvision import transforms as V1
    from torchvision.transforms import InterpolationMode

    preset = V1.Compose([V1.Resize(val_resize, interpolation=InterpolationMode.BILINEAR, antialias=True),
                         V1.CenterCrop(val_crop), V1.PILToTensor()])
    cfg = _cfg(toy_data / "imagenet", val_resize=val_resize, val_crop=val_crop)
    for split, step in ((photos, 1), (toy_data / "imagenet/val", 17)):
        ds = ImageFolder(split, eval_transform(cfg), seed=0, train=False)
        for index in range(0, len(ds), step):
            img, target = ds[(0, index)]
            path, label = ds.samples[index]
            assert target == label and img.shape == (val_crop, val_crop, 3) and img.dtype == torch.uint8
            assert torch.equal(img, _pil_preset(path, val_resize, val_crop)), path
            assert torch.equal(img, preset(Image.open(path).convert("RGB")).permute(1, 2, 0)), path
            assert img.float().std() > 10  # a real picture, not a flat patch


def _reference_without_erase(size, scale, ratio, auto_augment=True):
    from torchvision import transforms as V1
    from torchvision.transforms import InterpolationMode

    return V1.Compose([V1.RandomResizedCrop(size, scale=scale, ratio=ratio), V1.RandomHorizontalFlip(),
                       *([V1.AutoAugment(V1.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.NEAREST)]
                         if auto_augment else []), V1.PILToTensor()])


def test_same_draws_as_the_reference_pil_pipeline(toy_data, photos):
    """For one generator state, ours (from the encoded bytes) picks the reference's crop, flip and
    AutoAugment policy and magnitudes, and consumes exactly the reference's draws (the generator ends in
    the same state); the images differ only by the resize (torch's uint8 antialias instead of PIL's):
    at most 1 level, < 0.1 mean per image without AutoAugment (measured <= 0.25 on the photographs; a
    different crop or flip differs by tens), and on a small fraction of values after it (its Solarize,
    Posterize and Equalize turn a one-level difference into a large one on a few pixels)."""
    from PIL import Image

    cfg = _cfg(toy_data / "imagenet", crop_size=96, random_erasing=0.0, dct_downscale=False)  # (test_jpeg.py)
    ours = TrainTransform(cfg)
    files = sorted(photos.rglob("*.jpg")) + sorted((toy_data / "imagenet/train").rglob("*.jpg"))[::80]
    for use_aa in (False, True):
        ours.auto_augment = TrainTransform(cfg).auto_augment if use_aa else None
        ref = _reference_without_erase(96, cfg.scale, cfg.ratio, use_aa)
        for seed, f in enumerate(files):
            torch.manual_seed(seed)
            a = ours.augment_bytes(f.read_bytes(), str(f)).permute(2, 0, 1).int()
            after_ours = torch.rand(1)
            torch.manual_seed(seed)
            b = ref(Image.open(f).convert("RGB")).int()
            assert torch.equal(after_ours, torch.rand(1)), (f, use_aa)  # the same number of draws
            diff = (a - b).abs().float()
            if use_aa:
                assert (diff > 8).float().mean() < 0.05, (f, seed)
            else:
                assert diff.mean() < 0.3 and diff.max() <= 1, (f, diff.mean(), diff.max())


def test_read_is_the_one_place_bytes_come_from(photos):
    """A dataset that overrides read() (another store of encoded bytes) gives the same items."""
    cfg = _cfg(photos.parent, crop_size=64)

    class InMemory(ImageFolder):
        def read(self, index):
            return torch.frombuffer(bytearray(self.store[index]), dtype=torch.uint8)

    files = ImageFolder(photos, TrainTransform(cfg), seed=1, train=True)
    memory = InMemory(photos, TrainTransform(cfg), seed=1, train=True)
    memory.store = [open(p, "rb").read() for p, _ in memory.samples]
    for i in range(0, len(files), 5):
        a, b = files[(2, i)], memory[(2, i)]
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    val = ImageFolder(photos, eval_transform(cfg), seed=0, train=False)
    mem_val = InMemory(photos, eval_transform(cfg), seed=0, train=False)
    mem_val.store = memory.store
    assert torch.equal(val[(0, 3)][0], mem_val[(0, 3)][0])


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
    original = toy_data / "imagenet/val/n00000000_circle/circle_val_0000.jpg"
    assert torch.equal(images[[p for p, _ in ds.samples].index(odd)], ds.transform(original.read_bytes(), "x"))
    assert torch.equal(decode(odd), decode(str(original)))


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
    frames[0].save(tmp_path / "two.gif", save_all=True, append_images=frames[1:2])  # frames, not channels (3)
    with pytest.raises(DataError, match=r"two.gif: an animated GIF of 2 frames; expected a still image"):
        decode(str(tmp_path / "two.gif"))
    with pytest.raises(DataError, match=r"two.gif: an animated GIF of 2 frames; expected a still image"):
        # the val item too, not PIL's frame 0
        eval_transform(_cfg("unused"))((tmp_path / "two.gif").read_bytes(), str(tmp_path / "two.gif"))


def _bad_files(photo, folder):
    """Every kind of file the loaders have a behaviour for, written into folder/<class>/."""
    import io

    import numpy as np
    from PIL import Image

    cls = folder / "n0"
    cls.mkdir(parents=True)
    rgb = Image.open(photo).convert("RGB")
    jpeg = photo.read_bytes()
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    lying = bytearray(jpeg)
    lying[sof + 5:sof + 7] = (rgb.height * 3).to_bytes(2, "big")
    frames = [Image.new("RGB", (30, 20), (60 * i, 0, 0)) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    files = {"png.png": ("PNG", {}), "webp.webp": ("WEBP", {}), "gif.jpg": ("GIF", {}),
             "cmyk.jpg": ("JPEG", {"mode": "CMYK"}), "grey.jpg": ("JPEG", {"mode": "L"})}
    for name, (fmt, kw) in files.items():
        rgb.convert(kw.get("mode", "RGB")).save(cls / name, format=fmt)
    Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).save(cls / "png16.png")
    (cls / "truncated.jpg").write_bytes(jpeg[:len(jpeg) * 2 // 3])
    (cls / "lying.jpg").write_bytes(bytes(lying))
    (cls / "animated.jpg").write_bytes(animated.getvalue())
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "text.jpg").write_bytes(b"not an image at all")
    rgb.save(cls / "bmp.jpg", format="BMP")  # PIL reads it, torchvision (training) does not: refused in both
    return cls


def test_every_bad_file_gets_todays_behaviour_in_training_and_evaluation(photos, tmp_path):
    """PNG, WebP, GIF, CMYK, greyscale, 16-bit PNG: decoded; truncated JPEG, animated GIF, empty file,
    non-image: one DataError naming the file, the very message decode(path) gives (the oracle for
    today's behaviour); a JPEG whose header says 3x its height: whatever decode(path) does. Through the
    training item (crop drawn from the header first) and the evaluation item (PIL first)."""
    from data.classification import DataError, decode

    folder = _bad_files(sorted(photos.rglob("*.jpg"))[0], tmp_path / "split")
    cfg = _cfg(tmp_path, crop_size=64)
    train = ImageFolder(folder.parent, TrainTransform(cfg), seed=0, train=True)
    val = ImageFolder(folder.parent, eval_transform(cfg), seed=0, train=False)
    outcomes = {}
    for i, (path, _) in enumerate(train.samples):
        try:
            expected = decode(path)
        except DataError as exc:
            expected = str(exc)
        name = path.rsplit("/", 1)[1]
        for ds in (train, val):
            if isinstance(expected, str):
                with pytest.raises(DataError) as err:
                    ds[(0, i)]
                assert str(err.value) == expected, (name, ds.train)
                outcomes[name] = "error"
            else:
                image = ds[(0, i)][0]
                assert image.shape == (64, 64, 3) and image.dtype == torch.uint8
                if name == "grey.jpg":
                    assert torch.equal(image[..., 0], image[..., 1]) and torch.equal(image[..., 0], image[..., 2])
                outcomes[name] = "decoded"
    assert outcomes == {"animated.jpg": "error", "bmp.jpg": "error", "cmyk.jpg": "decoded", "empty.jpg": "error", "gif.jpg": "decoded",
                        "grey.jpg": "decoded", "lying.jpg": outcomes["lying.jpg"], "png.png": "decoded",
                        "png16.png": "decoded", "text.jpg": "error", "truncated.jpg": "error",
                        "webp.webp": "decoded"}
    assert "not an image" in str(pytest.raises(DataError, decode, str(folder / "text.jpg")).value)


def test_crop_draw_is_torchvisions_get_params():
    """The same rectangle and the same generator state after it, for every kind of image: ordinary, tiny,
    and so elongated that all 10 tries fail and torchvision falls back to its central crop."""
    from torchvision import transforms as V1

    from data.classification import _crop_params

    sizes = [(375, 500), (500, 333), (1, 1), (7, 3), (20, 2000), (2000, 20), (224, 224), (4000, 3000)]
    fallbacks = 0
    for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.5, 2.0)), ((1.0, 1.0), (1.0, 1.0))):
        for seed in range(150):
            size = sizes[seed % len(sizes)]
            torch.manual_seed(seed)
            ours, after = _crop_params(size, scale, ratio), torch.rand(1)
            torch.manual_seed(seed)
            theirs = V1.RandomResizedCrop.get_params(torch.empty(()).expand(3, *size), list(scale), list(ratio))
            assert ours == theirs and torch.equal(after, torch.rand(1)), (size, scale, ratio, seed)
            fallbacks += min(size) < 50 and max(size) > 1000
    assert fallbacks > 0


def test_data_section_bounds_name_the_key_and_the_range():
    """RandomResizedCrop's scale and ratio and RandomErasing's are open at 0 (a crop or box of zero area or
    zero aspect); scale and erasing_scale are fractions of the image (<= 1); std divides."""
    def problems(**kw):
        return [k for k, _ in _cfg("unused", **kw).validate()]

    assert problems() == []
    assert problems(scale=(1.0, 1.0), ratio=(1.0, 1.0)) == []  # a degenerate range is a fixed value
    for key, bad in (("scale", (0.0, 1.0)), ("scale", (0.5, 0.4)), ("scale", (0.08, 1.01)),
                     ("ratio", (0.0, 4 / 3)), ("erasing_scale", (0.0, 0.33)), ("erasing_ratio", (0.0, 3.3))):
        assert problems(**{key: bad}) == [key], (key, bad)
    message = dict(_cfg("unused", scale=(0.0, 1.0)).validate())["scale"]
    assert message == "expected [min, max] with 0 < min <= max <= 1.0, got [0.0, 1.0]"
    assert problems(std=(0.229, 0.0, 0.225)) == ["std"] and problems(std=(0.229, -0.1, 0.225)) == ["std"]


def test_erasing_that_finds_no_box_leaves_the_image_as_torchvision_does():
    """RandomErasing.get_params gives up after 10 draws and returns the whole image with the image itself as
    the value (forward then returns the input unchanged): no box. Here no box of 98-100% of a square image
    with an aspect ratio of 8-9 exists."""
    from torchvision.transforms import RandomErasing

    tf = TrainTransform(_cfg("unused", random_erasing=1.0, erasing_scale=(0.98, 1.0), erasing_ratio=(8.0, 9.0)))
    image = torch.rand(3, 64, 64)
    torch.manual_seed(0)
    assert torch.equal(RandomErasing(p=1.0, scale=(0.98, 1.0), ratio=(8.0, 9.0))(image), image)
    torch.manual_seed(0)
    assert tf.erase_box(torch.zeros(64, 64, 3, dtype=torch.uint8)).tolist() == [0, 0, 0, 0, 0]


def test_the_default_normalization_is_torchvisions_imagenet_one():
    """A recipe that states no mean/std normalizes as torchvision's MobileNetV3 weights' own transforms
    (the published evaluation), for classification and segmentation alike."""
    from torchvision.models import MobileNet_V3_Large_Weights

    from data.segmentation import SegmentationDataConfig

    preset = MobileNet_V3_Large_Weights.IMAGENET1K_V1.transforms()
    cfg = _cfg("unused")
    assert list(cfg.validate()) == []  # (a call into the module: tools/mutants.py selects tests by the lines they run)
    assert list(cfg.mean) == list(preset.mean) and list(cfg.std) == list(preset.std)
    seg = SegmentationDataConfig(root="r", batch_size=1, workers=0, crop_size=8, short_side=(8, 16), hflip=0.5,
                                 eval_size=8)
    assert list(seg.mean) == list(preset.mean) and list(seg.std) == list(preset.std)


def test_erasing_happens_when_the_draw_is_below_p_as_in_torchvision():
    """RandomErasing.forward erases when torch.rand(1) < p: a draw exactly equal to p does not erase."""
    torch.manual_seed(0)
    p = torch.rand(1).item()
    tf = TrainTransform(_cfg("unused", random_erasing=p))
    torch.manual_seed(0)
    assert tf.erase_box(torch.zeros(64, 64, 3, dtype=torch.uint8))[0].item() == 0
    tf = TrainTransform(_cfg("unused", random_erasing=min(1.0, p + 1e-7)))
    torch.manual_seed(0)
    assert tf.erase_box(torch.zeros(64, 64, 3, dtype=torch.uint8))[0].item() == 1


def test_encoded_bytes_become_a_writable_tensor_and_a_bytearray_is_not_copied():
    """torch.frombuffer warns on a read-only buffer (bytes) and shares memory with a writable one: bytes are
    copied once into a bytearray, a bytearray (what a shard read may hand over) is used as it is."""
    import warnings

    from data.classification import _as_tensor

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _as_tensor(b"\xff\xd8\x01")
    assert t.tolist() == [255, 216, 1]
    buf = bytearray(b"\xff\xd8\x01")
    shared = _as_tensor(buf)
    buf[2] = 7
    assert shared.tolist() == [255, 216, 7]


def test_data_section_limits_of_counts_probabilities_and_sizes():
    def problems(**kw):
        return list(_cfg("unused", **kw).validate())

    assert problems(batch_size=1, workers=0, hflip=0.0, random_erasing=1.0) == []
    assert problems(batch_size=0) == [("batch_size", "expected a positive per-process batch size, got 0")]
    assert problems(workers=-1) == [("workers", "expected >= 0, got -1")]
    for key in ("hflip", "random_erasing"):
        assert problems(**{key: 1.0}) == [] and problems(**{key: 0.0}) == []
        for bad in (-0.01, 1.01):
            assert problems(**{key: bad}) == [(key, f"expected a probability in [0, 1], got {bad}")]
    assert problems(crop_size=1, val_resize=1, val_crop=1) == []
    for key in ("crop_size", "val_resize", "val_crop"):
        assert (key, f"expected a positive size in pixels, got 0") in problems(**{key: 0}), key
    assert problems(val_resize=64, val_crop=64) == []
    assert problems(val_resize=63, val_crop=64) == [
        ("val_crop", "expected <= val_resize (63): the center crop is taken from the resized image")]


def test_an_erase_box_in_the_top_left_corner_is_erased():
    """Only get_params' give-up answer (the whole image at 0, 0) means no box: a smaller box drawn at the
    top-left corner is erased like any other (torchvision's RandomErasing erases it)."""
    from torchvision.transforms import RandomErasing

    tf = TrainTransform(_cfg("unused", random_erasing=1.0, erasing_scale=(0.3, 0.5), erasing_ratio=(1.0, 1.0)))
    image = torch.zeros(3, 8, 8)
    for seed in range(500):
        torch.manual_seed(seed)
        torch.rand(1)  # erase_box's p draw
        top, left, h, w, _ = RandomErasing.get_params(image, scale=(0.3, 0.5), ratio=(1.0, 1.0), value=[0])
        if (top, left) == (0, 0) and h < 8:
            break
    else:
        raise AssertionError("no top-left draw in 500 seeds")
    torch.manual_seed(seed)
    assert tf.erase_box(torch.zeros(8, 8, 3, dtype=torch.uint8)).tolist() == [1, 0, 0, h, w]


def test_the_default_erasing_box_is_torchvisions_random_erasing_one():
    """A recipe that states no erasing_scale / erasing_ratio erases as torchvision's RandomErasing defaults
    (the reference's --random-erase), the box's area fraction and aspect ratio."""
    cfg = _cfg("unused")
    assert list(cfg.validate()) == []  # (a call into the module: tools/mutants.py selects tests by the lines they run)
    reference = T.RandomErasing()
    assert tuple(cfg.erasing_scale) == tuple(reference.scale) and tuple(cfg.erasing_ratio) == tuple(reference.ratio)


def test_a_file_that_is_no_image_is_named_with_its_first_eight_bytes():
    from data.classification import DataError, decode_bytes

    with pytest.raises(DataError) as err:
        decode_bytes(b"Hello, world: plain text", "x.jpg")
    assert str(err.value) == ("x.jpg: not an image (the file starts with bytes 48 65 6c 6c 6f 2c 20 77, not a JPEG, "
                              "PNG, WebP or GIF signature)")


def test_steps_per_epoch_is_the_batch_count_of_one_ranks_padded_training_shard():
    """What train_qat.py derives the observer/BN freeze steps from: the batches (last one short) of a rank's
    training sampler, which pads the dataset to a multiple of the process count, as DistributedSampler does."""
    from torch.utils.data import BatchSampler

    from data.classification import steps_per_epoch

    for n, world, batch in [(1000, 8, 32), (1001, 8, 32), (1000, 1, 32), (10, 4, 1), (7, 3, 2)]:
        sampler = EpochSampler(n, rank=world - 1, world_size=world, seed=0, train=True)
        assert steps_per_epoch(n, world, batch) == len(BatchSampler(sampler, batch, drop_last=False)), (n, world)
    assert [steps_per_epoch(1000, 8, 32), steps_per_epoch(1001, 8, 32), steps_per_epoch(10, 4, 1)] == [4, 4, 3]


def test_the_center_crop_and_erasing_bounds_are_checked_at_their_edges():
    """val_crop may not exceed a positive val_resize (a zero val_resize is its own problem, not a crop one);
    erasing_scale is a fraction of the image (<= 1); a ratio range has no upper bound, and says so."""
    def problems(**kw):
        return list(_cfg("unused", **kw).validate())

    assert problems(val_resize=1, val_crop=2) == [
        ("val_crop", "expected <= val_resize (1): the center crop is taken from the resized image")]
    assert problems(val_resize=0) == [("val_resize", "expected a positive size in pixels, got 0")]
    assert problems(erasing_scale=(0.02, 1.0)) == []
    assert problems(erasing_scale=(0.02, 1.01)) == [
        ("erasing_scale", "expected [min, max] with 0 < min <= max <= 1.0, got [0.02, 1.01]")]
    assert problems(erasing_ratio=(0.0, 2.0)) == [
        ("erasing_ratio", "expected [min, max] with 0 < min <= max, got [0.0, 2.0]")]


def test_an_empty_a_one_byte_and_a_truncated_file_are_named_with_what_they_are(photos):
    """The messages a user sees for the files decode cannot read, compared whole; an empty file is empty
    however its bytes arrive (bytes, bytearray, numpy, tensor), a single byte is not."""
    import numpy as np

    from data.classification import DataError, decode_bytes

    def message(data):
        with pytest.raises(DataError) as err:
            decode_bytes(data, "x.jpg")
        return str(err.value)

    for empty in (b"", bytearray(), np.zeros(0, np.uint8), torch.zeros(0, dtype=torch.uint8)):
        assert message(empty) == "x.jpg: empty file (0 bytes)", type(empty)
    assert message(b"\x00") == ("x.jpg: not an image (the file starts with bytes 00, not a JPEG, PNG, "
                                "WebP or GIF signature)")
    jpeg = sorted(photos.rglob("*.jpg"))[0].read_bytes()
    half = jpeg[:len(jpeg) // 2]
    assert message(half) == "x.jpg: unreadable or truncated JPEG image (Image is incomplete or truncated)"


def test_a_16_bit_png_keeps_its_8_most_significant_bits(tmp_path):
    """What an 8-bit export of the image holds: 0xABCD -> 0xAB (grey, so all three channels)."""
    import numpy as np
    from PIL import Image

    from data.classification import decode

    values = np.array([[0x0000, 0x00FF, 0x0100], [0xABCD, 0x7FFF, 0xFFFF]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = decode(str(tmp_path / "deep.png"))
    assert image.dtype == torch.uint8 and image.shape == (3, 2, 3)
    for channel in image:
        assert channel.tolist() == [[0x00, 0x00, 0x01], [0xAB, 0x7F, 0xFF]]


def test_the_flip_is_torchvisions_coin_and_no_coin_is_drawn_without_a_flip():
    """RandomHorizontalFlip flips when torch.rand(1) < p, so a draw equal to hflip does not flip and the
    next float32 above it does; against torchvision's RandomResizedCrop + RandomHorizontalFlip on the same
    tensor (a 16 px crop of the whole 16 px image: no resampling). The reference preset adds the flip only
    when hflip > 0: then no number is drawn for it."""
    from torchvision import transforms as V1

    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :, 10:] = 255  # white on the right: a flip puts it on the left
    whole = dict(crop_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), auto_augment=None)
    flips = []
    for seed in range(3):
        torch.manual_seed(seed)
        V1.RandomResizedCrop.get_params(image, [1.0, 1.0], [1.0, 1.0])
        coin = torch.rand(1)
        for hflip in (coin.item(), torch.nextafter(coin, torch.ones(1)).item()):
            tf = TrainTransform(_cfg("unused", hflip=hflip, **whole))
            reference = V1.Compose([V1.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0)),
                                    V1.RandomHorizontalFlip(hflip)])
            torch.manual_seed(seed)
            ours = tf.augment(image).permute(2, 0, 1)
            torch.manual_seed(seed)
            theirs = reference(image)
            assert torch.equal(ours, theirs), (seed, hflip)
            flips.append(bool(ours[0, 0, 0] == 255))
    assert flips == [False, True] * 3
    torch.manual_seed(0)
    TrainTransform(_cfg("unused", hflip=0.0, **whole)).augment(image)
    after = torch.rand(1)
    torch.manual_seed(0)
    V1.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image)
    assert torch.equal(after, torch.rand(1))


def test_the_erase_box_of_a_non_square_image_is_torchvisions_for_its_height_and_width():
    """erase_box reads the (H, W, 3) image's height and width as RandomErasing reads a (3, H, W) tensor's:
    the same boxes, and the same "no box found" (the whole image at 0, 0) on a 24 x 40 image."""
    from torchvision.transforms import RandomErasing

    image = torch.zeros(24, 40, 3, dtype=torch.uint8)
    tf = TrainTransform(_cfg("unused", random_erasing=1.0))
    for seed in range(20):
        torch.manual_seed(seed)
        torch.rand(1)  # erase_box's p draw
        top, left, h, w, _ = RandomErasing.get_params(torch.zeros(3, 24, 40), scale=(0.02, 0.33),
                                                      ratio=(0.3, 3.3), value=[0])
        torch.manual_seed(seed)
        assert tf.erase_box(image).tolist() == [1, top, left, h, w], seed
    tf = TrainTransform(_cfg("unused", random_erasing=1.0, erasing_scale=(0.98, 1.0),
                             erasing_ratio=(8.0, 9.0)))
    torch.manual_seed(0)
    assert tf.erase_box(image).tolist() == [0, 0, 0, 0, 0]


def test_no_erasing_is_five_zeros_and_p_0_draws_nothing():
    """The box of an image not erased is [0, 0, 0, 0, 0] (stacked with the others in a batch); with
    random_erasing 0 the reference adds no RandomErasing, so no number is drawn."""
    image = torch.zeros(8, 8, 3, dtype=torch.uint8)
    torch.manual_seed(0)
    coin = torch.rand(1).item()
    tf = TrainTransform(_cfg("unused", random_erasing=coin / 2))
    torch.manual_seed(0)
    assert tf.erase_box(image).tolist() == [0, 0, 0, 0, 0]
    torch.manual_seed(0)
    assert TrainTransform(_cfg("unused", random_erasing=0.0)).erase_box(image).tolist() == [0, 0, 0, 0, 0]
    assert torch.rand(1).item() == coin


def test_the_normalization_constants_are_not_module_state():
    """mean and std come from the recipe: BatchTransform saves nothing into a state_dict (a module holding
    it would otherwise carry them in its checkpoints) and loads from an empty one."""
    tf = BatchTransform((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False)
    assert tf.state_dict() == {} and [name for name, _ in tf.named_buffers()] == ["scale", "shift"]
    tf.load_state_dict({})


def test_a_fresh_sampler_gives_epoch_0_keys_in_distributed_samplers_epoch_0_order():
    """Before any set_epoch: keys (0, i), the training order DistributedSampler's own for epoch 0 (padded
    to equal shards), the evaluation order rank, rank + world, ... (not padded)."""
    from torch.utils.data import DistributedSampler

    train = list(EpochSampler(12, rank=1, world_size=3, seed=4, train=True))
    order = DistributedSampler(range(12), num_replicas=3, rank=1, shuffle=True, seed=4)
    assert train == [(0, i) for i in order]
    assert list(EpochSampler(7, rank=1, world_size=3, seed=4, train=False)) == [(0, 1), (0, 4)]
    # lengths: a training shard padded to ceil(10 / 3) = 4 on every rank; an eval shard unpadded
    assert [len(EpochSampler(10, rank, 3, 0, train=True)) for rank in range(3)] == [4, 4, 4]
    assert [len(EpochSampler(10, rank, 3, 0, train=False)) for rank in range(3)] == [4, 3, 3]


def test_loader_workers_persist_across_epochs_whenever_there_are_any():
    """persistent_workers with 1 worker or more (torch refuses it with 0); built, not iterated: no worker
    starts."""
    from torch.utils.data import BatchSampler

    from data.classification import make_loader

    batches = BatchSampler(EpochSampler(4, 0, 1, 0, train=False), 2, False)
    assert make_loader(list(range(4)), batches, 0, False).persistent_workers is False
    one = make_loader(list(range(4)), batches, 1, True)
    assert one.persistent_workers is True and one.num_workers == 1 and one.pin_memory is True


# ----------------------------------------------------------------------------- folders and loaders


def _tiny_split(split, classes, per_class=1):
    """split/<class>/<i>.jpg: 8 px JPEGs, a different grey per class."""
    from PIL import Image

    for c, name in enumerate(classes):
        (split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (20 * c, 20 * c, 20 * c)).save(split / name / f"{i}.jpg")


def test_a_split_is_its_sorted_class_folders_and_their_images_and_each_missing_piece_is_named(tmp_path):
    from data.classification import DataError, count_images, scan_image_folder

    split = tmp_path / "root/train"
    (split / "b").mkdir(parents=True)
    (split / "a").mkdir()
    for name in ("b/2.JPG", "b/1.png", "a/x.webp", "a/notes.txt", "a/y.jpeg", "top.jpg"):
        (split / name).write_bytes(b"")  # scanning reads names only
    assert scan_image_folder(split) == (["a", "b"], [(str(split / name), label) for name, label in (
        ("a/x.webp", 0), ("a/y.jpeg", 0), ("b/1.png", 1), ("b/2.JPG", 1))])
    assert count_images(split) == 4 and count_images(tmp_path / "root/val") is None

    def problem(path):
        with pytest.raises(DataError) as err:
            scan_image_folder(path)
        return str(err.value)

    assert problem(tmp_path / "nowhere/train") == f"data.root: {tmp_path / 'nowhere'} does not exist"
    assert problem(tmp_path / "root/val") == (f"{tmp_path / 'root/val'}: split folder not found "
                                              "(expected data.root/val/<class>/<image>)")
    (tmp_path / "root/val").mkdir()
    assert problem(tmp_path / "root/val") == (f"{tmp_path / 'root/val'}: no class folders "
                                              f"(expected {tmp_path / 'root/val'}/<class>/<image>)")
    (split / "c").mkdir()
    (split / "c/readme.txt").write_text("")
    assert problem(split) == f"{split / 'c'}: class folder has no images (.jpg, .jpeg, .png, .webp)"


def test_build_loaders_gives_shuffled_training_batches_and_every_val_image_once_in_order(tmp_path):
    """One CPU process: the training batches are DistributedSampler's shuffle (last batch short), the val
    batches every image once in folder order (last batch short); nothing pinned without CUDA; training
    items carry their erase box. The val images are checked before anything is returned (unless asked not
    to); a recipe with fewer classes than the folders is refused, as many as the folders is not."""
    from torch.utils.data import DistributedSampler

    from data.classification import DataError, build_loaders
    from engine.distributed import DistState

    root = tmp_path / "data"
    _tiny_split(root / "train", ["a", "b"], 3)
    _tiny_split(root / "val", ["a", "b"], 3)
    cfg = _cfg(root, batch_size=4, crop_size=8, val_resize=8, val_crop=8, auto_augment=None)
    train_set, train_loader, val_set, val_loader = build_loaders(cfg, 2, 7, DistState())
    assert not train_loader.pin_memory and not val_loader.pin_memory
    assert list(val_loader.batch_sampler) == [[(0, 0), (0, 1), (0, 2), (0, 3)], [(0, 4), (0, 5)]]
    shuffled = list(DistributedSampler(range(6), num_replicas=1, rank=0, shuffle=True, seed=7))
    assert shuffled != list(range(6))
    assert list(train_loader.batch_sampler) == [[(0, i) for i in shuffled[:4]],
                                                [(0, i) for i in shuffled[4:]]]
    images, targets, erase = next(iter(train_loader))
    assert images.shape == (4, 8, 8, 3)
    assert targets.tolist() == [train_set.samples[i][1] for i in shuffled[:4]]
    assert erase.shape == (4, 5)
    images, targets = next(iter(val_loader))
    assert images.shape == (4, 8, 8, 3) and targets.tolist() == [0, 0, 0, 1]
    with pytest.raises(DataError) as err:
        build_loaders(cfg, 1, 7, DistState())
    assert str(err.value) == f"{root}: 2 classes on disk but model.num_classes is 1"
    bad = root / "val/b/1.jpg"
    bad.write_bytes(b"text, not a JPEG")
    with pytest.raises(DataError) as err:
        build_loaders(cfg, 2, 7, DistState())
    assert str(err.value) == (f"the validation set: 1 of 6 images cannot be used:\n  {bad}: not an image "
                              "(the file starts with bytes 74 65 78 74 2c 20 6e 6f, not a JPEG, PNG, WebP or "
                              "GIF signature)")
    assert build_loaders(cfg, 2, 7, DistState(), check_val=False)[3] is not None
    assert build_loaders(cfg, 2, 7, DistState(), train=False, check_val=False)[:2] == (None, None)


def test_train_and_val_with_different_class_folders_are_named_ten_at_most(tmp_path):
    from data.classification import DataError, build_loaders
    from engine.distributed import DistState

    for extra, listed in ((11, "c00, c01, c02, c03, c04, c05, c06, c07, c08, c09 ..."),
                          (10, "c00, c01, c02, c03, c04, c05, c06, c07, c08, c09")):
        root = tmp_path / str(extra)
        _tiny_split(root / "train", ["shared"] + [f"c{i:02d}" for i in range(extra)])
        _tiny_split(root / "val", ["shared", "v0"])
        with pytest.raises(DataError) as err:
            build_loaders(_cfg(root, crop_size=8, val_resize=8, val_crop=8), 100, 0, DistState())
        assert str(err.value) == (f"{root}: train/ and val/ have different class folders (labels are the "
                                  "sorted folder names, so they must be the same): only in train/: "
                                  f"{listed}; only in val/: v0")


def test_the_val_item_of_a_16_bit_png_is_the_reference_preset_on_its_8_bit_export(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (a white image); the val item of a 16-bit PNG is the
    reference preset's on the image's 8 most significant bits, as training decodes it."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as V1
    from torchvision.transforms import InterpolationMode

    deep = np.random.default_rng(0).integers(0, 65536, (30, 40), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    data = (tmp_path / "deep.png").read_bytes()
    item = eval_transform(_cfg("unused", val_resize=20, val_crop=16))(data, "deep.png")
    preset = V1.Compose([V1.Resize(20, interpolation=InterpolationMode.BILINEAR, antialias=True),
                         V1.CenterCrop(16), V1.PILToTensor()])
    expected = preset(Image.fromarray((deep >> 8).astype(np.uint8)).convert("RGB")).permute(1, 2, 0)
    assert torch.equal(item, expected) and expected.float().std() > 10


def test_the_val_transform_warns_about_nothing(photos):
    """One warning per validation image would flood the log: torchvision's Resize warns when told not to
    antialias a PIL image (PIL always does), so the preset asks for antialiasing as the reference does."""
    import warnings

    path = sorted(photos.rglob("*.jpg"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = eval_transform(_cfg("unused"))(path.read_bytes(), str(path))
    assert item.shape == (64, 64, 3)


def test_the_data_section_is_frozen():
    """Nothing writes back into the config (DESIGN rule 1)."""
    import dataclasses

    cfg = _cfg("unused")
    assert list(cfg.validate()) == []  # (a call into the module: tools/mutants.py selects tests by lines run)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hflip = 0.0


def test_the_crop_draw_on_tiny_images_refuses_a_side_that_rounds_to_0_pixels_as_torchvision_does():
    """On 1-3 px images a drawn side often rounds to 0 pixels (a 1 x 0 crop): torchvision draws again, and so
    must the draw here (the same rectangles and the same generator state after them)."""
    from torchvision import transforms as V1

    from data.classification import _crop_params

    zero_sides = 0
    for size in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1)):
        for seed in range(100):
            torch.manual_seed(seed)
            ours, after = _crop_params(size, (0.08, 1.0), (3 / 4, 4 / 3)), torch.rand(1)
            torch.manual_seed(seed)
            theirs = V1.RandomResizedCrop.get_params(torch.empty(()).expand(3, *size), [0.08, 1.0],
                                                     [3 / 4, 4 / 3])
            assert ours == theirs and torch.equal(after, torch.rand(1)), (size, seed)
            torch.manual_seed(seed)  # the first try's sides, as get_params rounds them
            area = size[0] * size[1] * torch.empty(1).uniform_(0.08, 1.0).item()
            aspect = torch.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))).item()
            zero_sides += min(round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))) == 0
    assert zero_sides > 10


def test_the_val_item_of_a_jpeg_is_pils_decode_as_in_the_reference(photos, monkeypatch):
    """The reference reads validation images with PIL. Training's decoder (torchvision's) gives the same
    values for these JPEGs (both are libjpeg-turbo here), so only which one runs tells them apart: with
    torchvision's unavailable, the val item is still the PIL preset's."""
    from data import classification

    def no_torchvision_decode(data, name):
        raise AssertionError(f"{name}: decoded by torchvision, not PIL")

    monkeypatch.setattr(classification, "decode_bytes", no_torchvision_decode)
    for path in sorted(photos.rglob("*.jpg"))[:3]:
        item = eval_transform(_cfg("unused"))(path.read_bytes(), str(path))
        assert torch.equal(item, _pil_preset(path, 73, 64)), path


def test_decoding_shows_no_torchvision_deprecation_warning_even_where_warnings_are_errors(photos):
    """torchvision 0.29 warns on every decode_image call that its decoders are deprecated; under `-W error`
    (or pytest, or PYTHONWARNINGS=default) that warning would stop or flood a run. The module silences it."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, data.classification as c; x = c.decode(sys.argv[1]); "
            "print(tuple(x.shape), x.dtype)")
    path = str(next(Path(photos).rglob("*.jpg")))
    out = subprocess.run([sys.executable, "-W", "error", "-c", code, path], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert out.stdout.startswith("(3, ") and out.stdout.strip().endswith("torch.uint8")
