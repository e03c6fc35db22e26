"""ImageNet-style classification data: ImageFolder on JPEGs, decoded to uint8 tensors.

An item is read as the file's encoded bytes (`ImageFolder.read`), then decoded and transformed from
those bytes (`decode_bytes`, which names the file in its errors), so a dataset can read them from
another store than one file per image.

The training transform is the published one, split in two:
- per sample, in the loader workers, uint8 throughout: decode, RandomResizedCrop (torch's uint8
  antialiased resize), horizontal flip, AutoAugment (data/autoaugment.py: torchvision's, cheaper), plus
  the RandomErasing *draw* (whether and where to erase), all from a generator seeded by (seed, epoch,
  sample index);
- per batch, on the training device (BatchTransform): uint8 -> float, normalize, erase.
Erasing with value 0 after normalization is what the reference does per sample; doing it as one
masked fill on the batch gives the same pixels for a fraction of the cost, and the erase box was
drawn with torchvision's own RandomErasing.get_params, so the distribution is unchanged.

Evaluation is torchvision's reference preset value for value: PIL decode, PIL bilinear resize of
the shorter side, center crop (the published accuracies were measured on that input).
"""

from __future__ import annotations

import dataclasses
import functools
import io as _io
import math
import os
import warnings
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import io
from torchvision.transforms import InterpolationMode
from torchvision import transforms as V1

from data.autoaugment import AutoAugment

try:  # libjpeg-turbo's partial decode, compiled by setup.py where libjpeg's headers are installed
    from data import _jpeg
except ImportError:  # pragma: no cover - then JPEGs are decoded whole (the same pixels, slower)
    _jpeg = None
from engine.datacheck import check_val_images
from engine.errors import DataError  # noqa: F401  (re-exported: the scripts' data errors)
from engine.preemption import data_loader
from engine.seeding import sample_seed

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATION = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                 "bicubic": InterpolationMode.BICUBIC}


@dataclasses.dataclass(frozen=True)
class ClassificationDataConfig:
    root: str                                   # contains train/ and val/ in ImageFolder layout
    batch_size: int                             # per process
    workers: int                                # loader processes per training process
    crop_size: int                              # RandomResizedCrop output
    scale: tuple[float, float]                  # RandomResizedCrop area range
    ratio: tuple[float, float]                  # RandomResizedCrop aspect range
    interpolation: Literal["nearest", "bilinear", "bicubic"]
    hflip: float                                # probability
    auto_augment: Optional[Literal["imagenet", "cifar10", "svhn"]]
    auto_augment_interpolation: Literal["nearest", "bilinear"]
    random_erasing: float                       # probability
    val_resize: int
    val_crop: int
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # libjpeg's scaled IDCT (1/2, 1/4, 1/8) where the crop is at least twice crop_size on both sides (7% of
    # ImageNet-sized crops at 224): 6% less CPU per image; those crops differ from the reference's PIL
    # resize by a few levels (docs/data.md). false: every crop is decoded at full size.
    dct_downscale: bool = True
    format: Literal["folder", "shards"] = "folder"  # shards: data.root as tools/make_shards.py writes it
                                                    # (the same samples, order and bytes: the same run)

    def validate(self):
        if self.batch_size <= 0:
            yield "batch_size", f"expected a positive per-process batch size, got {self.batch_size}"
        if self.workers < 0:
            yield "workers", f"expected >= 0, got {self.workers}"
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"expected a probability in [0, 1], got {getattr(self, name)}"
        for name in ("crop_size", "val_resize", "val_crop"):
            if getattr(self, name) <= 0:
                yield name, f"expected a positive size in pixels, got {getattr(self, name)}"
        if 0 < self.val_resize < self.val_crop:
            yield "val_crop", f"expected <= val_resize ({self.val_resize}): the center crop is taken from the resized image"
        for name, hi in (("scale", 1.0), ("erasing_scale", 1.0), ("ratio", None), ("erasing_ratio", None)):
            lo_v, hi_v = getattr(self, name)
            if not (0 < lo_v <= hi_v and (hi is None or hi_v <= hi)):
                bound = f"0 < min <= max <= {hi}" if hi else "0 < min <= max"
                yield name, f"expected [min, max] with {bound}, got {list(getattr(self, name))}"
        if any(v <= 0 for v in self.std):
            yield "std", f"expected positive values, got {list(self.std)}"


# ----------------------------------------------------------------------------- dataset


def scan_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    if not split_dir.parent.exists():
        raise DataError(f"data.root: {split_dir.parent} does not exist")
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder not found (expected data.root/{split_dir.name}/<class>/<image>)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    samples = []
    for i, c in enumerate(classes):
        files = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{split_dir / c}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(str(p), i) for p in files]
    return classes, samples


_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"RIFF": "WebP", b"GIF8": "GIF"}


def read_bytes(path: str) -> bytes:
    """A file's bytes, read by Python (torchvision's read_file cannot open a name that is not valid
    UTF-8, which Linux file systems allow: Python keeps such bytes as surrogate escapes)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def decode(path: str) -> torch.Tensor:
    """File -> uint8 RGB tensor (C, H, W); a clear DataError naming the file if it is not a still image.
    16-bit PNGs keep their 8 most significant bits (what an 8-bit export of the image holds)."""
    return decode_bytes(read_bytes(path), path)


def decode_bytes(data, name: str) -> torch.Tensor:
    """Encoded image (bytes, bytearray, numpy or uint8 tensor) -> uint8 RGB tensor (C, H, W), as
    `decode`; its errors name `name`."""
    data = _as_tensor(data)
    if data.numel() == 0:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        image = io.decode_image(data, mode=io.ImageReadMode.RGB)
    except RuntimeError as exc:
        head = bytes(data[:8].tolist())
        kind = next((k for sig, k in _SIGNATURES.items() if head.startswith(sig)), None)
        if kind is None:
            raise DataError(f"{name}: not an image (the file starts with bytes {head.hex(' ')}, not a JPEG, PNG, "
                            "WebP or GIF signature)") from None
        reason = str(exc).strip().splitlines()[0].split(", ")[-1]
        raise DataError(f"{name}: unreadable or truncated {kind} image ({reason})") from None
    if image.ndim != 3:  # an animated GIF: (frames, C, H, W)
        raise DataError(f"{name}: an animated GIF of {image.shape[0]} frames; expected a still image "
                        "(save one frame as a JPEG or PNG)")
    if image.dtype != torch.uint8:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def _as_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)


def _as_buffer(data):
    """What PIL reads: the bytes themselves, or a tensor's numpy view."""
    return data.numpy() if isinstance(data, torch.Tensor) else data


class ImageFolder(Dataset):
    """Items are addressed by (epoch, index) keys from EpochSampler, so augmentation is seeded per sample."""

    def __init__(self, split_dir: str | Path, transform, seed: int, train: bool, data_format: str = "folder"):
        from data.shards import open_split

        self.split_dir = Path(split_dir)
        self.shards = open_split(self.split_dir, data_format, "imagefolder")  # None: the folder's files
        if self.shards is None:
            self.classes, self.samples = scan_image_folder(self.split_dir)
        else:  # the writer kept scan_image_folder's order: sample i is the folder's sample i
            self.classes = self.shards.classes
            self.samples = [(self.shards.name(i), int(c)) for i, c in enumerate(self.shards.labels)]
        self.transform, self.seed, self.train = transform, seed, train

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int):
        """The encoded bytes of sample `index` (bytes-like, or a uint8 tensor): its file, or its shard's
        range (data.format shards)."""
        return read_bytes(self.samples[index][0]) if self.shards is None else self.shards.read(index)

    def load(self, index: int) -> torch.Tensor:
        """Sample `index` decoded to uint8 RGB (3, H, W) (the val-set check and --check-data)."""
        return decode_bytes(self.read(index), self.samples[index][0])

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, target = self.samples[index]
        data = self.read(index)
        if not self.train:
            return self.transform(data, path), target
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            image = self.transform.augment_bytes(data, path)
            erase = self.transform.erase_box(image)
        return image, target, erase


# ----------------------------------------------------------------------------- transforms


class TrainTransform:
    """Per-sample part of the training transform: encoded bytes (or a decoded uint8 (3, H, W) tensor)
    in, uint8 (S, S, 3) out, plus the erase-box draw.

    Every random draw is the reference pipeline's own, in its order (RandomResizedCrop.get_params on
    the image's size, the flip's coin, AutoAugment, RandomErasing.get_params), so for a given generator
    state the crop, flip, policy, magnitudes and box are the ones torchvision's reference transform
    would pick. The pixels differ from the reference's only by the resize: torch's antialiased uint8
    resize (the same kernel as transforms v2) instead of PIL's, 0.18 ms against PIL's 0.7 ms per crop
    on the photographs, within one level of it (docs/data.md gives the bound measured there).
    AutoAugment runs on PIL, because its rotate/shear/translate cost ~1 ms per 224 px image as float
    grid_sample on tensors and ~0.12 ms as PIL's uint8 affine (measured on the 2-core CI machine). From
    AutoAugment on, images stay height-width-channel, so the batch arrives on the device already in
    channels_last layout.

    A JPEG is decoded only where the crop lies (data/_jpeg.c, libjpeg-turbo's partial decode): the crop is
    drawn from the header's size, rows below it are never read, rows above it only entropy-decoded, and
    the pixels are those of a full decode cropped afterwards (0 differing values, tested). Where the crop
    is at least twice crop_size on both sides, libjpeg's scaled IDCT also halves it (or more) while
    decoding (data.dct_downscale). Everything else (PNG, WebP, GIF, CMYK, a file libjpeg warns about,
    or an install without the compiled data/_jpeg) is decoded whole by torchvision, as before. Measured
    on the photographs, what else was tried, and what it costs: docs/data.md.
    """

    def __init__(self, cfg: ClassificationDataConfig):
        self.size, self.scale, self.ratio = cfg.crop_size, cfg.scale, cfg.ratio
        self.mode = cfg.interpolation
        self.hflip = cfg.hflip
        self.auto_augment = None
        if cfg.auto_augment is not None:
            self.auto_augment = AutoAugment(V1.AutoAugmentPolicy(cfg.auto_augment),
                                             interpolation=INTERPOLATION[cfg.auto_augment_interpolation])
        self.p, self.erase_scale, self.erase_ratio = cfg.random_erasing, cfg.erasing_scale, cfg.erasing_ratio
        self.max_denom = 8 if cfg.dct_downscale else 1  # the largest IDCT downscale augment_bytes may use

    def augment_bytes(self, data, name: str) -> torch.Tensor:
        """Encoded image -> uint8 (S, S, 3); `name` is the file named in errors. A JPEG: the crop drawn
        from its header's size, only the crop decoded (at 1/d scale where it is >= 2d x crop_size);
        anything else, or a JPEG libjpeg warns about: decoded whole, as `decode` does, then cropped."""
        if _jpeg is not None:
            buf = _as_buffer(data)
            size = _jpeg.size(buf)
            if size is not None:
                top, left, h, w = _crop_params(size, self.scale, self.ratio)
                d = 1  # the IDCT's downscale: the largest that leaves the crop at least crop_size
                while d < self.max_denom and min(h, w) >= 2 * d * self.size:
                    d *= 2
                # at 1/d: every scaled pixel the crop covers part of (its edges move by < d source pixels)
                t, b = top // d, -(-(top + h) // d)
                l, r = left // d, -(-(left + w) // d)
                pixels = _jpeg.crop(buf, t, l, b - t, r - l, d)
                if pixels is None:  # corrupt or truncated: decode_bytes says what it is, or decodes it
                    return self._finish(decode_bytes(data, name)[None, :, top:top + h, left:left + w])
                # (h, w, 3) bytes: the crop in channels-last layout, as _finish wants it
                return self._finish(torch.frombuffer(pixels, dtype=torch.uint8).view(1, b - t, r - l, 3)
                                    .permute(0, 3, 1, 2))
        return self.augment(decode_bytes(data, name))

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """Decoded uint8 (3, H, W) -> uint8 (S, S, 3)."""
        top, left, h, w = _crop_params(image.shape[-2:], self.scale, self.ratio)
        return self._finish(image[None, :, top:top + h, left:left + w])

    def _finish(self, crop: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) uint8 crop -> resize, flip, AutoAugment -> (S, S, 3) uint8."""
        antialias = {"antialias": True, "align_corners": False} if self.mode != "nearest" else {}
        # A channels-last copy of the crop (0.01 ms) makes torch resize in that layout and return the
        # height-width-channel bytes PIL takes (0.17 ms, against 0.27 ms + 0.2 ms for the strided view).
        crop = crop.contiguous(memory_format=torch.channels_last)
        out = nn.functional.interpolate(crop, size=(self.size, self.size), mode=self.mode, **antialias)[0]
        pil = Image.frombytes("RGB", (self.size, self.size), out.permute(1, 2, 0).contiguous().numpy())
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.auto_augment is not None:
            pil = self.auto_augment(pil)
        return torch.from_numpy(np.array(pil))  # (S, S, 3) uint8

    def erase_box(self, image: torch.Tensor) -> torch.Tensor:
        """[apply, top, left, height, width] drawn exactly as torchvision's RandomErasing draws it."""
        if self.p == 0 or torch.rand(1).item() >= self.p:
            return torch.zeros(5, dtype=torch.int32)
        shape_only = torch.empty(()).expand(3, image.shape[0], image.shape[1])  # get_params reads the shape
        top, left, h, w, _ = V1.RandomErasing.get_params(shape_only, scale=self.erase_scale,
                                                         ratio=self.erase_ratio, value=[0])
        if h == image.shape[0]:  # get_params' "no box found" (0, 0, H, W): a box it finds is shorter than H
            return torch.zeros(5, dtype=torch.int32)  # and the image is returned as is
        return torch.tensor([1, top, left, h, w], dtype=torch.int32)


def slow_decode_note() -> str | None:
    """A line for the run log when data/_jpeg is not built (training then decodes whole JPEGs)."""
    if _jpeg is not None:
        return None
    return ("note: data/_jpeg (libjpeg-turbo's partial decode) is not built, so training decodes whole JPEGs "
            "(the same images, about 25% more loader CPU): install libjpeg's headers (apt-get install libjpeg-dev, "
            "or libjpeg-turbo-devel) and reinstall (pip install -e .); docs/data.md")


def _crop_params(size_hw, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params for an image of this size (it reads only the size): the
    same torch draws in the same order and the same arithmetic, with log(ratio) computed once per ratio
    (half its cost per image; tests/data/test_classification.py compares them)."""
    height, width = int(size_hw[0]), int(size_hw[1])
    area = height * width
    lo, hi = _log_ratio(tuple(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.empty(1).uniform_(lo, hi).exp_().item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            return i, j, h, w
    in_ratio = width / height  # torchvision's fallback: the central crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=None)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    return tuple(float(v) for v in torch.log(torch.tensor(ratio)))


def decode_pil(data, name: str) -> Image.Image:
    """Encoded image -> PIL RGB, as torchvision's reference scripts load it (PIL open + convert("RGB")).
    What PIL cannot read that way (a damaged file, an animated GIF, a 16-bit PNG), and formats the
    training loader does not decode (BMP, TIFF, ...), go through `decode_bytes`: its clear error
    naming `name`, or today's image of it."""
    try:
        with Image.open(_io.BytesIO(_as_buffer(data))) as im:
            if im.format in _DECODED_FORMATS and getattr(im, "n_frames", 1) == 1 and im.mode in _PIL_8BIT:
                return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass
    image = decode_bytes(data, name)
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")


_PIL_8BIT = {"RGB", "L", "P", "CMYK", "RGBA", "LA", "PA", "YCbCr", "RGBX", "1"}
_DECODED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}  # what torchvision's decode_image (training) reads


def eval_transform(cfg: ClassificationDataConfig):
    """torchvision's reference evaluation preset (ClassificationPresetEval, PIL backend): PIL decode,
    PIL bilinear resize of the shorter side to val_resize, center crop val_crop; (S, S, 3) uint8 out,
    like training. (encoded bytes, file name) in."""
    resize_crop = V1.Compose([V1.Resize(cfg.val_resize, interpolation=InterpolationMode.BILINEAR, antialias=True),
                              V1.CenterCrop(cfg.val_crop)])
    return lambda data, name: torch.from_numpy(np.array(resize_crop(decode_pil(data, name))))


class BatchTransform(nn.Module):
    """On the training device: uint8 batch -> normalized float batch in the training memory format,
    erase boxes zeroed. One uint8->float copy straight into the target layout, then two in-place
    passes; erasing touches only the erased boxes (about 20% of the images, a fraction of each)."""

    def __init__(self, mean, std, channels_last: bool):
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t,
                             persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor, erase: torch.Tensor | None = None) -> torch.Tensor:
        """images: uint8 (N, H, W, 3) on the device; erase: (N, 5) int boxes on the CPU, or None."""
        images = images.permute(0, 3, 1, 2)  # a view: (N, 3, H, W) in channels_last memory format
        x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=self.memory_format)
        x.copy_(images).mul_(self.scale).add_(self.shift)
        if erase is not None:
            for n, (apply, top, left, h, w) in enumerate(erase.tolist()):
                if apply:
                    x[n, :, top:top + h, left:left + w] = 0.0
        return x


# ----------------------------------------------------------------------------- sampling and loading


class EpochSampler(Sampler):
    """Yields (epoch, index) keys.

    train: DistributedSampler's per-epoch shuffle (seeded by seed and epoch), padded to equal shards.
    eval: indices rank, rank + world, ... with no padding, so every image is counted exactly once.
    """

    def __init__(self, n: int, rank: int, world_size: int, seed: int, train: bool):
        self.n, self.rank, self.world, self.train, self.epoch = n, rank, world_size, train, 0
        self._dist = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed) \
            if train else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self._dist is not None:
            self._dist.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = iter(self._dist) if self._dist is not None else range(self.rank, self.n, self.world)
        return ((self.epoch, i) for i in indices)

    def __len__(self) -> int:
        return len(self._dist) if self._dist is not None else len(range(self.rank, self.n, self.world))


def make_loader(dataset: ImageFolder, batches: Sampler, workers: int, pin_memory: bool) -> DataLoader:
    """`batches`: a batch sampler (training: engine.loop.EpochBatches, resumable mid-epoch)."""
    # The loader draws its workers' base seed from `generator` each time an iterator starts; with the
    # global RNG that draw would happen at a different point in a resumed run and shift every later
    # dropout / stochastic-depth draw. Augmentation is seeded per sample, so this seed is unused.
    return data_loader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                       persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def build_loaders(cfg: ClassificationDataConfig, num_classes: int, seed: int, dist, train: bool = True,
                  check_val: bool = True):
    """(train_set, train_loader, val_set, val_loader) of data.root's ImageFolder; the train pair is
    (None, None) when not training. The train loader's batches are engine.loop.EpochBatches (resumable
    mid-epoch); evaluation shards without padding, so every image is counted once. The val images'
    headers are checked here (engine.datacheck.check_val_images), so a bad one stops the run before
    training, not after an epoch; `check_val` False leaves them to --check-data's full decode."""
    from engine.loop import EpochBatches

    root = Path(cfg.root)
    pin = dist.device.type == "cuda"
    val_set = ImageFolder(root / "val", eval_transform(cfg), seed, train=False, data_format=cfg.format)
    val_sampler = EpochSampler(len(val_set), dist.rank, dist.world_size, seed, False)
    val_loader = make_loader(val_set, BatchSampler(val_sampler, cfg.batch_size, False), cfg.workers, pin)
    train_set = train_loader = None
    if train:
        train_set = ImageFolder(root / "train", TrainTransform(cfg), seed, train=True, data_format=cfg.format)
        if train_set.classes != val_set.classes:
            train_c, val_c = set(train_set.classes), set(val_set.classes)
            only = {"train": sorted(train_c - val_c), "val": sorted(val_c - train_c)}
            raise DataError(f"{root}: train/ and val/ have different class folders (labels are the sorted "
                            "folder names, so they must be the same): "
                            + "; ".join(f"only in {k}/: {', '.join(v[:10])}" + (" ..." if len(v) > 10 else "")
                                        for k, v in only.items() if v))
        sampler = EpochSampler(len(train_set), dist.rank, dist.world_size, seed, True)
        train_loader = make_loader(train_set, EpochBatches(sampler, cfg.batch_size), cfg.workers, pin)
    if len(val_set.classes) > num_classes:
        raise DataError(f"{root}: {len(val_set.classes)} classes on disk but model.num_classes is {num_classes}")
    if check_val:
        shards = val_set.shards
        check_val_images([p for p, _ in val_set.samples], None, None,
                         decode if shards is None else lambda p: val_set.load(shards.index_of(p)), cfg.workers, dist,
                         open_file=open if shards is None else shards.open)
    return train_set, train_loader, val_set, val_loader


def count_images(split_dir: Path) -> int | None:
    """Number of images in an ImageFolder split without sorting or decoding; None if it is not there."""
    if not split_dir.is_dir():
        return None
    if (split_dir / "index.json").is_file():  # a shard set (data.format shards)
        from data.shards import load_index

        return len(load_index(split_dir)["samples"]["name"])
    return sum(1 for c in os.scandir(split_dir) if c.is_dir()
               for f in os.scandir(c.path) if f.name.lower().endswith(IMAGE_EXTENSIONS))


def steps_per_epoch(n_images: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n_images / world_size) / batch_size)
