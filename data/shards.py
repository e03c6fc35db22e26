"""A dataset as a few hundred large files: plain tar shards holding the original encoded bytes, plus an index.

Why: ImageNet is 1.28 million files; a cluster file system (Lustre, GPFS, NFS) pays a metadata operation
for each open, every epoch. A shard set is read by sample index (os.pread of one byte range on a file
descriptor each loader worker keeps open), so the sampler order, the per-sample seeds and exact mid-epoch
resume are the folder's: sample i of the shard set is sample i of the folder, byte for byte.

Layout of a shard root (tools/make_shards.py writes it; `data.root` points at it with `data.format: shards`):

    ROOT/manifest.json                     every file below with its size and SHA-256; written last: a root
                                           with a manifest is complete (tools/stage_shards.py copies by it)
    ROOT/<split>/index.json                one shard set per split (ImageNet: train/, val/; COCO:
    ROOT/<split>/shard-00000.tar ...       train2017/, val2017/), the split names of the folder layout
    ROOT/annotations/instances_*.json      COCO: the annotation files, copied byte for byte

index.json: {"format", "version", "kind" ("imagefolder" | "files"), "classes" (imagefolder: the sorted class
folders), "shards": [{"file", "bytes", "sha256", "samples"}], "samples": {"name", "shard", "offset", "length",
"label"}} (one list per field, sample i at position i). A name is the path below the split folder
(`n01440764/n01440764_10026.JPEG`; COCO: the annotation file's `file_name`).

Why plain tar and not a field library: webdataset's `wids` indexes tar shards for random access but keys
samples by (shard, position) through its own cache/download layer and its ShardListDataset; litdata and
mosaicml-streaming shard into their own formats (re-encoded or chunked bytes) and own the sampling order
(their StreamingDataset shuffles and resumes by its own state), which is what this repository must not
give up (DESIGN.md rule 9). A tar with an index keeps the published bytes, stays readable by `tar`, and
needs ~60 lines of reading code here. See docs/shards.md.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from engine.checkpoint import file_sha256
from engine.errors import DataError

FORMAT, VERSION = "mbv3-shards", 1
INDEX, MANIFEST, STAGED = "index.json", "manifest.json", ".staged.json"
SHARD_BYTES = 1 << 30            # target shard size: ~1 GiB, a few hundred shards for ImageNet's 140 GB
CHUNK = 8 << 20                  # bytes per read when hashing or copying
MAX_OPEN = 256                   # shard file descriptors a reader keeps open (per process)
PARTIAL = ".partial"


def is_shard_set(split_dir: str | Path) -> bool:
    return (Path(split_dir) / INDEX).is_file()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ----------------------------------------------------------------------------- index


def load_index(split_dir: str | Path) -> dict:
    """The validated index of a shard set: lists become numpy arrays; every problem a DataError naming it."""
    path = Path(split_dir) / INDEX
    if not path.is_file():
        hint = " (it holds image files: set data.format=folder)" if Path(split_dir).is_dir() else ""
        raise DataError(f"{path}: shard index not found; data.format shards expects data.root/{Path(split_dir).name}/"
                        f"{INDEX} as tools/make_shards.py writes it{hint}")
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable shard index ({exc}); expected the JSON tools/make_shards.py writes") \
            from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise DataError(f"{path}: not a shard index of format {FORMAT!r} version {VERSION} "
                        f"(found format {doc.get('format') if isinstance(doc, dict) else None!r})")
    try:
        shards, samples = doc["shards"], doc["samples"]
        names = [str(n) for n in samples["name"]]
        cols = {k: np.asarray(samples[k], dtype=np.int64) for k in ("shard", "offset", "length")}
        labels = np.asarray(samples["label"], dtype=np.int64) if doc["kind"] == "imagefolder" else None
        image_ids = np.asarray(samples["image_id"], dtype=np.int64) if doc["kind"] == "files" else None
        sizes = np.asarray([int(s["bytes"]) for s in shards], dtype=np.int64)
        files = [str(s["file"]) for s in shards]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: damaged shard index (missing or mistyped {exc}); rewrite the set with "
                        "tools/make_shards.py") from None
    n = len(names)
    if any(len(c) != n for c in (*cols.values(), *(a for a in (labels, image_ids) if a is not None))):
        raise DataError(f"{path}: damaged shard index: its sample lists have different lengths")
    shard, offset, length = cols["shard"], cols["offset"], cols["length"]
    if n and (shard.min() < 0 or shard.max() >= len(files)):
        raise DataError(f"{path}: damaged shard index: a sample refers to a shard it does not list")
    bad = np.flatnonzero((offset < 0) | (length < 0) | (offset + length > sizes[shard]))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{path}: damaged shard index: sample {names[i]} at offset {offset[i]}, {length[i]} bytes, "
                        f"lies outside {files[shard[i]]} ({sizes[shard[i]]} bytes)")
    if labels is not None and n and (labels.min() < 0 or labels.max() >= len(doc.get("classes") or [])):
        raise DataError(f"{path}: damaged shard index: labels outside its {len(doc.get('classes') or [])} classes")
    doc["samples"] = {"name": names, **cols, "label": labels, "image_id": image_ids}
    doc["_sizes"], doc["_files"] = sizes, files
    return doc


# ----------------------------------------------------------------------------- reading


class _Member(io.RawIOBase):
    """A sample's byte range of a shard as a read-only file (for header checks that seek and read a little)."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos) if n else b""
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class ShardSource:
    """Samples of a shard set by index: names, labels (ImageFolder sets), and `read(i)` -> the encoded bytes.

    Opening it reads the index and stats every shard (a few hundred stats: missing or resized shards are
    found at start-up, not mid-epoch). Each process (each loader worker) opens a shard once and keeps the
    descriptor (at most MAX_OPEN); reads are os.pread, so forked workers never share a file position.
    Checksums are not recomputed here (hashing 140 GB takes minutes): tools/stage_shards.py and
    `tools/make_shards.py --verify` do that.
    """

    def __init__(self, split_dir: str | Path, kind: str):
        self.dir = Path(split_dir)
        if not self.dir.is_dir():
            raise DataError(f"{self.dir}: shard set not found (data.format shards expects data.root/{self.dir.name}/ "
                            "as tools/make_shards.py writes it)")
        index = load_index(self.dir)
        if index["kind"] != kind:
            raise DataError(f"{self.dir / INDEX}: a shard set of kind {index['kind']!r}; this dataset needs {kind!r} "
                            f"({'an ImageFolder split' if kind == 'imagefolder' else 'the images of a COCO split'})")
        self.classes: list[str] = list(index.get("classes") or [])
        s = index["samples"]
        self.names: list[str] = s["name"]
        self.labels, self.image_ids = s["label"], s["image_id"]
        self._shard, self._offset, self._length = s["shard"], s["offset"], s["length"]
        self.files = [self.dir / f for f in index["_files"]]
        self.sizes = index["_sizes"]
        for f, size in zip(self.files, self.sizes):
            try:
                actual = f.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{f}: shard missing ({self.dir / INDEX} lists it with {size} bytes); copy the "
                                "whole set again (tools/stage_shards.py) or rewrite it (tools/make_shards.py)") \
                    from None
            if actual != size:
                what = "truncated" if actual < size else "longer than its index says"
                raise DataError(f"{f}: shard {what}: {actual} bytes, but {self.dir / INDEX} says {size}; the shard "
                                "and its index do not match (copy the set again, or rewrite it)")
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid, self._lock = os.getpid(), threading.Lock()  # the val check reads from threads
        self._by_name: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self):  # spawned workers open their own descriptors
        state = dict(self.__dict__)
        state["_fds"], state["_by_name"] = OrderedDict(), None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def name(self, i: int) -> str:
        """Sample i for messages: `SHARD[member]`."""
        return f"{self.files[self._shard[i]]}[{self.names[i]}]"

    def index_of(self, name: str) -> int:
        """The sample of a name() (a dict built on first use: only checks that go by name need it)."""
        if self._by_name is None:
            with self._lock:
                if self._by_name is None:
                    self._by_name = {self.name(i): i for i in range(len(self))}
        return self._by_name[name]

    def _fd(self, shard: int) -> int:
        with self._lock:
            return self._fd_locked(shard)

    def _fd_locked(self, shard: int) -> int:
        if os.getpid() != self._pid:  # a forked worker: the parent's descriptors stay the parent's
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.files[shard], os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.files[shard]}: cannot open the shard ({exc.strerror})") from None
            self._fds[shard] = fd
            if len(self._fds) > MAX_OPEN:  # (ImageNet has ~150 shards: never reached there)
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def read(self, i: int) -> bytes:
        shard, offset, length = int(self._shard[i]), int(self._offset[i]), int(self._length[i])
        fd = self._fd(shard)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise DataError(f"{self.files[shard]}: shard truncated: sample {self.names[i]} is at bytes {offset}.."
                            f"{offset + length} but the file ends at {os.fstat(fd).st_size} (its index says "
                            f"{self.sizes[shard]} bytes); copy the set again or rewrite it")
        return data

    def match(self, files: Sequence[str], image_ids: Sequence[int], ann_file: Path) -> list[int]:
        """The shard sample of each (file_name, image id) of an annotation file; a DataError naming the
        annotation file if one is absent or the shards hold it under another image id (another file)."""
        where = {n: k for k, n in enumerate(self.names)}
        absent = [f for f in files if f not in where]
        if absent:
            raise DataError(f"{ann_file}: lists {len(absent)} image(s) that the shard set {self.dir} does not hold, "
                            f"e.g. {absent[0]} (were the shards written from another annotation file?)")
        pos = [where[f] for f in files]
        if self.image_ids is not None:
            other = [(f, i, int(self.image_ids[k])) for f, i, k in zip(files, image_ids, pos) if self.image_ids[k] != i]
            if other:
                f, i, j = other[0]
                raise DataError(f"{ann_file}: {len(other)} image(s) have other ids than in the shard set {self.dir}, "
                                f"e.g. {f}: id {i} here, {j} in {self.dir / INDEX} (the shards were written from "
                                "another annotation file)")
        return pos

    def open(self, name: str, mode: str = "rb"):
        """A sample, by name(), as a read-only binary file (engine.datacheck reads headers and ends)."""
        i = self.index_of(name)
        shard = int(self._shard[i])
        return io.BufferedReader(_Member(self._fd(shard), int(self._offset[i]), int(self._length[i])))


def open_split(split_dir: str | Path, data_format: str, kind: str) -> ShardSource | None:
    """The ShardSource of a split for data.format shards; None for folder (a folder that is in fact a shard
    set is named so)."""
    if data_format == "shards":
        return ShardSource(split_dir, kind)
    if is_shard_set(split_dir):
        raise DataError(f"{split_dir}: a shard set (it holds {INDEX}), read as a folder of images; set "
                        "data.format=shards")
    return None


# ----------------------------------------------------------------------------- verification


def verify_set(split_dir: str | Path, log=print) -> dict:
    """Every shard's size and SHA-256 against the index (the full read: about 1.5 GB/s per core)."""
    index = load_index(split_dir)
    for s, f in zip(index["shards"], index["_files"]):
        path = Path(split_dir) / f
        if not path.is_file():
            raise DataError(f"{path}: shard missing (listed in {Path(split_dir) / INDEX})")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise DataError(f"{path}: shard {'truncated' if size < s['bytes'] else 'resized'}: {size} bytes, "
                            f"its index says {s['bytes']}")
        digest = file_sha256(path)
        if digest != s["sha256"]:
            raise DataError(f"{path}: shard corrupted: SHA-256 {digest[:16]}..., its index says "
                            f"{s['sha256'][:16]}... (same size; the bytes differ)")
    log(f"{split_dir}: {len(index['shards'])} shards, {len(index['samples']['name'])} samples: sizes and SHA-256 "
        "match the index")
    return index


# ----------------------------------------------------------------------------- writing


def plan_shards(sizes: Sequence[int], shard_bytes: int) -> list[range]:
    """Consecutive samples per shard: a shard is closed before the sample that would take it past
    `shard_bytes` (tar headers counted); every shard holds at least one sample. Deterministic from the
    sizes, so a resumed writer finds the same shards."""
    out, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        cost = 512 + -(-n // 512) * 512
        if i > start and used + cost > shard_bytes:
            out.append(range(start, i))
            start, used = i, 0
        used += cost
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


class _HashingWriter:
    def __init__(self, fh):
        self.fh, self.hash, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size


def _members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every file in a tar, as tarfile reads it back."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]


def _write_shard(path: Path, names: list[str], files: list[str], sizes: list[int]) -> dict:
    """One shard: written under a temporary name, read back (size, SHA-256, the tar's own member table
    against what was written), then renamed: a shard under its final name is complete."""
    tmp = path.with_name(path.name + PARTIAL)
    members = []
    with open(tmp, "wb") as raw:
        out = _HashingWriter(raw)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, src, size in zip(names, files, sizes):
                try:
                    with open(src, "rb") as fh:
                        data = fh.read()
                except OSError as exc:
                    raise DataError(f"{src}: cannot read ({exc.strerror})") from None
                if len(data) != size:
                    raise DataError(f"{src}: {len(data)} bytes now, {size} when the set was planned: the source "
                                    "changed while the shards were written; run the writer again")
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = size, 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                members.append((name, tar.offset - -(-size // 512) * 512, size))
        raw.flush()
        os.fsync(raw.fileno())
    digest, total = out.hash.hexdigest(), out.size
    if tmp.stat().st_size != total or file_sha256(tmp) != digest:
        raise DataError(f"{tmp}: the shard read back differs from what was written (size or SHA-256): the disk "
                        "or file system lost data; run the writer again")
    if _members(tmp) != members:
        raise DataError(f"{tmp}: the shard's tar member table differs from the index being written")
    os.replace(tmp, path)
    return {"file": path.name, "bytes": total, "sha256": digest, "samples": len(names), "_members": members}


def _check_written(path: Path, names: list[str], sizes: list[int]) -> dict | None:
    """A shard left by an earlier (killed) writer: its entry if it holds exactly the planned samples."""
    try:
        members = _members(path)
    except (tarfile.TarError, OSError):
        return None
    if [(m[0], m[2]) for m in members] != list(zip(names, sizes)):
        return None
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path), "samples": len(names),
            "_members": members}


def write_set(out_dir: Path, names: list[str], files: list[str], labels: list[int] | None,
              classes: list[str] | None, shard_bytes: int = SHARD_BYTES, log=print,
              image_ids: list[int] | None = None) -> dict:
    """Write one split's shards and its index (last, atomically). Finished shards of an earlier run that
    hold their planned samples are kept (checked: member table, size, SHA-256); a half-written one is redone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / INDEX).exists():
        log(f"{out_dir}: complete ({INDEX} present), kept")
        return json.loads((out_dir / INDEX).read_text())
    for stale in out_dir.glob(f"*{PARTIAL}"):
        stale.unlink()
    sizes = []
    for f in files:
        try:
            sizes.append(os.stat(f).st_size)
        except OSError as exc:
            raise DataError(f"{f}: cannot read ({exc.strerror})") from None
    plan = plan_shards(sizes, shard_bytes)
    entries, start = [], time.perf_counter()
    for k, rng in enumerate(plan):
        path = out_dir / f"shard-{k:05d}.tar"
        part = (names[rng.start:rng.stop], files[rng.start:rng.stop], sizes[rng.start:rng.stop])
        entry = _check_written(path, part[0], part[2]) if path.exists() else None
        if entry is not None:
            log(f"{path}: written by an earlier run, checked, kept")
        else:
            entry = _write_shard(path, *part)
        entries.append(entry)
        if k % 10 == 9 or k == len(plan) - 1:
            log(f"{out_dir}: {k + 1}/{len(plan)} shards, {rng.stop} samples, {time.perf_counter() - start:.0f} s")
    for extra in sorted(set(p.name for p in out_dir.glob("shard-*.tar")) - {e["file"] for e in entries}):
        (out_dir / extra).unlink()  # a shard of an earlier plan (the source changed)
    shard_of, offset, length = [], [], []
    for k, e in enumerate(entries):
        for _, off, size in e.pop("_members"):
            shard_of.append(k)
            offset.append(off)
            length.append(size)
    if len(shard_of) != len(names):
        raise DataError(f"{out_dir}: {len(shard_of)} samples in the shards, {len(names)} in the source")
    index = {"format": FORMAT, "version": VERSION, "kind": "imagefolder" if labels is not None else "files",
             "classes": classes, "shards": entries,
             "samples": {"name": names, "shard": shard_of, "offset": offset, "length": length,
                         **({"label": labels} if labels is not None else {"image_id": image_ids})}}
    _atomic_write(out_dir / INDEX, json.dumps(index, separators=(",", ":")).encode())
    return index


def write_manifest(root: Path, indexes: dict[str, dict], extra_files: list[str]) -> dict:
    """ROOT/manifest.json (last, atomically): every file of the set, its size and SHA-256."""
    files = []
    for split, index in indexes.items():
        files += [{"path": f"{split}/{s['file']}", "bytes": s["bytes"], "sha256": s["sha256"]} for s in index["shards"]]
        files.append({"path": f"{split}/{INDEX}", "bytes": (root / split / INDEX).stat().st_size,
                      "sha256": file_sha256(root / split / INDEX)})
    files += [{"path": rel, "bytes": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)}
              for rel in extra_files]
    manifest = {"format": FORMAT, "version": VERSION, "splits": list(indexes), "files": files}
    _atomic_write(root / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found; expected a complete shard set written by tools/make_shards.py "
                        "(the manifest is written last: without it the set is incomplete)")
    try:
        doc = json.loads(path.read_bytes())
        files = [(str(f["path"]), int(f["bytes"]), str(f["sha256"])) for f in doc["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable shard manifest ({exc})") from None
    if doc.get("format") != FORMAT:
        raise DataError(f"{path}: not a shard manifest of format {FORMAT!r}")
    return {**doc, "_files": files}


# ----------------------------------------------------------------------------- staging


def default_stage_dir() -> Path:
    """Node-local disk: $SLURM_TMPDIR (SLURM's per-job local folder, where the cluster sets one), else /tmp."""
    base = os.environ.get("SLURM_TMPDIR") or "/tmp"
    return Path(base) / f"mbv3-shards-{os.environ.get('USER', os.getuid())}"


def _copy_checked(src: Path, dst: Path, size: int, digest: str) -> None:
    """src -> dst under a temporary name, hashed on the way; renamed only if size and SHA-256 match."""
    tmp = dst.with_name(dst.name + PARTIAL)
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(CHUNK):
                h.update(chunk)
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
        got = tmp.stat().st_size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if got != size or h.hexdigest() != digest:
        tmp.unlink(missing_ok=True)
        what = f"{got} bytes, the manifest says {size}" if got != size else \
            f"SHA-256 {h.hexdigest()[:16]}..., the manifest says {digest[:16]}..."
        raise DataError(f"{src}: {'truncated' if got < size else 'corrupted'} ({what}); the shard set is damaged: "
                        "rewrite it with tools/make_shards.py")
    os.replace(tmp, dst)


def stage(src_root: str | Path, dest_dir: str | Path | None = None, log=print) -> Path:
    """Copy a shard root to node-local disk once per node: DEST/<name of the root>. Callers on one node
    (ranks, jobs) take a lock; the first copies, the others wait and find it done. Each file is copied
    under a temporary name, its SHA-256 checked against the manifest, then renamed, so a killed copy
    resumes with the files it finished. The manifest and a `.staged.json` stamp come last: a staged root
    without the stamp is incomplete. A staged root with the stamp of this manifest and every file at its
    size is used as it is."""
    src = Path(src_root).resolve()
    manifest = read_manifest(src)
    digest = file_sha256(src / MANIFEST)
    dest_parent = Path(dest_dir) if dest_dir else default_stage_dir()
    dest = dest_parent / src.name
    try:
        dest.mkdir(parents=True, exist_ok=True)
        lock = open(dest_parent / f".{src.name}.lock", "w")
    except OSError as exc:
        raise DataError(f"{dest}: cannot create the staging folder ({exc.strerror})") from None
    with lock:
        waited = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)
        waited = time.perf_counter() - waited
        files = manifest["_files"]

        def present(rel: str, size: int) -> bool:
            try:
                return (dest / rel).stat().st_size == size
            except OSError:
                return False

        stamp = dest / STAGED
        try:
            done = json.loads(stamp.read_text()).get("manifest_sha256") == digest
        except (OSError, ValueError):
            done = False
        if done and all(present(rel, size) for rel, size, _ in files):
            log(f"stage: {dest} already holds {src} ({len(files)} files)"
                + (f"; waited {waited:.0f} s for another process staging it" if waited > 1 else ""))
            return dest
        stamp.unlink(missing_ok=True)
        todo = [(rel, size, sha) for rel, size, sha in files if not present(rel, size)]
        need = sum(size for _, size, _ in todo)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise DataError(f"{dest}: not enough space to stage {src}: {_gb(need)} to copy, {_gb(free)} free on "
                            "that disk; free space there or stage elsewhere (--dest / STAGE_DATA=PATH)")
        start, copied, rel = time.perf_counter(), 0, MANIFEST
        try:
            for rel, size, sha in todo:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    _copy_checked(src / rel, dest / rel, size, sha)
                except FileNotFoundError as exc:
                    if Path(exc.filename or "").is_relative_to(dest):
                        raise
                    raise DataError(f"{src / rel}: missing (listed in {src / MANIFEST}); the shard set is "
                                    "incomplete: rewrite it with tools/make_shards.py") from None
                copied += size
            rel = MANIFEST
            _atomic_write(dest / MANIFEST, (src / MANIFEST).read_bytes())  # on disk before the stamp says done
            _atomic_write(stamp, json.dumps({"manifest_sha256": digest, "source": str(src)}).encode())
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                for leftover in (dest / (rel + PARTIAL), stamp.with_name(stamp.name + PARTIAL)):
                    leftover.unlink(missing_ok=True)
                raise DataError(f"{dest}: no space left on device while staging {rel} ({_gb(copied)} of "
                                f"{_gb(need)} copied); the staged set is not marked complete; free space there or "
                                "stage elsewhere (--dest / STAGE_DATA=PATH)") from None
            raise DataError(f"{dest / rel}: cannot stage ({exc.strerror or exc})") from None
        secs = time.perf_counter() - start
        log(f"stage: copied {len(todo)} of {len(files)} files ({_gb(copied)}) of {src} to {dest} in {secs:.1f} s, "
            "SHA-256 checked")
    return dest


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use tools/make_shards.py or tools/stage_shards.py")
