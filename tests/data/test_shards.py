"""data/shards.py, tools/make_shards.py and tools/stage_shards.py on real files.

Oracles: the source files themselves (every sample's bytes), GNU tar (extracts the shards to the same
files), an order computed here with sorted os.listdir, sha256sum, a real tmpfs for the full disk; Python's
tarfile (members, modes, sizes), hashlib, open()/io.FileIO (how a sample opened by name reads and seeks), and
sets and manifests written here from docs/shards.md's format."""

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data import shards
from data.classification import decode
from engine.errors import DataError
from tests.conftest import ROOT, run_in_process, small_disk
from tests.test_recipe_keys import C_BASE, C_RECIPE, _tiny_imagefolder
from tools import make_shards


@pytest.fixture(scope="module")
def folder(toy_data, tmp_path_factory) -> Path:
    return _tiny_imagefolder(toy_data / "imagenet", tmp_path_factory.mktemp("sh") / "tiny", train=6, val=2)


@pytest.fixture(scope="module")
def written(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sh") / "set"
    assert make_shards.main([str(folder), str(out), "--shard-size", "64KB"]) == 0
    return out


def copy_set(written: Path, dst: Path) -> Path:
    shutil.copytree(written, dst)
    return dst


def test_samples_are_the_folders_bytes_in_its_order_and_tar_reads_the_shards(folder, written, tmp_path):
    for split in ("train", "val"):
        classes = sorted(os.listdir(folder / split))
        order = [(f"{c}/{f}", k) for k, c in enumerate(classes) for f in sorted(os.listdir(folder / split / c))]
        src = shards.ShardSource(written / split, "imagefolder")
        assert src.classes == classes
        assert list(zip(src.names, src.labels.tolist())) == order
        assert all(src.read(i) == (folder / split / n).read_bytes() for i, n in enumerate(src.names))
        files = sorted(p.name for p in (written / split).glob("shard-*.tar"))
        index = json.loads((written / split / "index.json").read_text())
        assert len(files) > 2 and all(s["bytes"] <= 64 * 1024 + 1024 + tarfile.RECORDSIZE  # + end blocks, padding
                                      for s in index["shards"] if s["samples"] > 1)
        out = tmp_path / split
        out.mkdir()
        for f in files:
            subprocess.run(["tar", "-xf", str(written / split / f), "-C", str(out)], check=True)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(n for n, _ in order)
        assert all((out / n).read_bytes() == (folder / split / n).read_bytes() for n, _ in order)
    manifest = json.loads((written / "manifest.json").read_text())
    for f in manifest["files"]:  # checksums as sha256sum computes them
        line = subprocess.run(["sha256sum", str(written / f["path"])], capture_output=True, text=True).stdout
        assert line.split()[0] == f["sha256"] and (written / f["path"]).stat().st_size == f["bytes"]


def test_a_reader_opens_each_shard_once_per_process(written):
    src = shards.ShardSource(written / "train", "imagefolder")
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and opened is not None else None)
    for _ in range(2):
        for i in range(len(src)):
            src.read(i)
    mine = [str(p) for p in opened if str(p).startswith(str(written))]
    opened = None  # noqa: F841  (the hook stays installed: it stops recording)
    assert sorted(mine) == sorted(str(f) for f in src.files)


KILL = """
import os, signal, sys
sys.path.insert(0, {root!r})
from data import shards
calls = [0]
real = {target}


def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)


{target} = killing
from tools import {tool}
{tool}.main({argv!r})
"""


def killed(tool: str, argv: list[str], target: str, n: int) -> None:
    """Run tools/<tool>.py's main(argv) in a subprocess that SIGKILLs itself at the n-th call of `target`."""
    code = KILL.format(root=str(ROOT), target=target, n=n, tool=tool, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def test_a_killed_writer_resumes_keeping_its_finished_shards(folder, written, tmp_path):
    out = tmp_path / "set"
    argv = [str(folder), str(out), "--shard-size", "64KB"]
    killed("make_shards", argv, "shards._HashingWriter.write", 60)  # in the middle of a shard
    train = sorted((out / "train").glob("shard-*.tar"))
    assert len(train) >= 3 and len(list((out / "train").glob("*.partial"))) == 1
    assert not (out / "train/index.json").exists() and not (out / "manifest.json").exists()
    train[1].write_bytes(train[1].read_bytes()[:-2000])  # and a finished shard damaged since: redone, not kept
    kept = {p.name: p.stat().st_ino for p in train if p != train[1]}
    assert make_shards.main(argv) == 0
    assert {p.name: p.stat().st_ino for p in (out / "train").glob("shard-*.tar") if p.name in kept} == kept
    assert not list(out.rglob("*.partial"))
    for p in written.rglob("*"):  # the same set as the uninterrupted writer's, byte for byte
        if p.is_file():
            assert (out / p.relative_to(written)).read_bytes() == p.read_bytes(), p


def test_a_complete_set_is_not_overwritten(folder, written, capsys):
    before = (written / "manifest.json").read_bytes()
    assert make_shards.main([str(folder), str(written)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"make_shards.py: error: {written}: a complete shard set is already there (manifest.json); refusing to "
        "overwrite it: choose another output folder, or delete this one first")
    assert (written / "manifest.json").read_bytes() == before


def _message(fn) -> str:
    with pytest.raises(DataError) as exc:
        fn()
    return str(exc.value)


def test_missing_truncated_corrupted_shards_and_a_mismatched_index_are_named(written, tmp_path, capsys):
    out = copy_set(written, tmp_path / "set")
    val = out / "val"
    index = json.loads((val / "index.json").read_text())
    first = val / index["shards"][0]["file"]
    size = index["shards"][0]["bytes"]

    first.rename(tmp_path / "away")
    assert _message(lambda: shards.ShardSource(val, "imagefolder")) == (
        f"{first}: shard missing ({val / 'index.json'} lists it with {size} bytes); copy the whole set again "
        "(tools/stage_shards.py) or rewrite it (tools/make_shards.py)")
    assert make_shards.main(["--verify", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (f"make_shards.py: error: {first}: missing (listed in "
                                               f"{out / 'manifest.json'})")
    assert _message(lambda: shards.stage(out, tmp_path / "local", log=lambda m: None)) == (
        f"{first}: missing (listed in {out / 'manifest.json'}); the shard set is incomplete: rewrite it with "
        "tools/make_shards.py")
    (tmp_path / "away").rename(first)

    src = shards.ShardSource(val, "imagefolder")  # opened whole, truncated afterwards: the read names it
    data = first.read_bytes()
    first.write_bytes(data[:600])
    assert index["samples"]["shard"][1] == 0
    name = src.names[1]
    offset, length = index["samples"]["offset"][1], index["samples"]["length"][1]
    assert _message(lambda: src.read(1)) == (
        f"{first}: shard truncated: sample {name} is at bytes {offset}..{offset + length} but the file ends at "
        f"600 (its index says {size} bytes); copy the set again or rewrite it")
    assert _message(lambda: shards.ShardSource(val, "imagefolder")) == (
        f"{first}: shard truncated: 600 bytes, but {val / 'index.json'} says {size}; the shard and its index do "
        "not match (copy the set again, or rewrite it)")

    first.write_bytes(data[:700] + bytes([data[700] ^ 0xFF]) + data[701:])  # same size, one byte flipped
    shards.ShardSource(val, "imagefolder")  # a start-up does not hash 140 GB; verification and staging do
    want = hashlib.sha256(first.read_bytes()).hexdigest()
    assert _message(lambda: shards.verify_set(val, log=lambda m: None)) == (
        f"{first}: shard corrupted: SHA-256 {want[:16]}..., its index says {index['shards'][0]['sha256'][:16]}... "
        "(same size; the bytes differ)")
    assert make_shards.main(["--verify", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"make_shards.py: error: {first}: corrupted: its SHA-256 differs from the manifest's (same size)")
    assert _message(lambda: shards.stage(out, tmp_path / "local", log=lambda m: None)) == (
        f"{first}: corrupted (SHA-256 {want[:16]}..., the manifest says {index['shards'][0]['sha256'][:16]}...); "
        "the shard set is damaged: rewrite it with tools/make_shards.py")
    assert not (tmp_path / "local/set/.staged.json").exists()
    assert not list((tmp_path / "local").rglob("*.partial"))
    first.write_bytes(data)

    index["samples"]["offset"][-1] = index["shards"][-1]["bytes"] - 10  # an index that is not its shards'
    (val / "index.json").write_text(json.dumps(index))
    last = index["samples"]["name"][-1]
    assert _message(lambda: shards.ShardSource(val, "imagefolder")) == (
        f"{val / 'index.json'}: damaged shard index: sample {last} at offset {index['shards'][-1]['bytes'] - 10}, "
        f"{index['samples']['length'][-1]} bytes, lies outside {index['shards'][-1]['file']} "
        f"({index['shards'][-1]['bytes']} bytes)")


def test_a_label_set_other_than_the_recipes_is_named(written, tmp_path):
    proc = run_in_process("train_classification.py", ["--recipe", C_RECIPE, *C_BASE, f"data.root={written}",
                                                      "data.format=shards", "model.num_classes=5",
                                                      f"run.output_dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"train_classification.py: error: {written}: 10 classes on disk but "
                                   "model.num_classes is 5")
    out = copy_set(written, tmp_path / "set")
    index = json.loads((out / "val/index.json").read_text())
    index["classes"][3] = "n99999999_other"
    (out / "val/index.json").write_text(json.dumps(index))
    proc = run_in_process("train_classification.py", ["--recipe", C_RECIPE, *C_BASE, f"data.root={out}",
                                                      "data.format=shards", f"run.output_dir={tmp_path / 'r2'}"],
                          tmp_path)
    assert proc.returncode == 1
    assert "train/ and val/ have different class folders" in proc.stderr
    assert "only in val/: n99999999_other" in proc.stderr


def test_the_val_start_up_check_reads_headers_from_the_shards(folder, tmp_path):
    bad = copy_set(folder, tmp_path / "tiny")
    victim = sorted((bad / "val").rglob("*.jpg"))[1]
    victim.write_bytes(victim.read_bytes()[:400])  # truncated JPEG: header fine, end marker missing
    assert make_shards.main([str(bad), str(tmp_path / "set"), "--shard-size", "64KB"]) == 0
    rel = str(victim.relative_to(bad / "val"))
    proc = run_in_process("train_classification.py", ["--recipe", C_RECIPE, *C_BASE, f"data.root={tmp_path / 'set'}",
                                                      "data.format=shards", f"run.output_dir={tmp_path / 'r'}"],
                          tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "train_classification.py: error: the validation set: 1 of 20 images cannot be used:"
    assert lines[1].startswith(f"  {tmp_path / 'set/val'}/shard-") and f".tar[{rel}]: unreadable or truncated JPEG" \
        in lines[1]
    with pytest.raises(DataError):  # the oracle: the folder's own decode of the same bytes fails too
        decode(str(victim))


# ----------------------------------------------------------------------------- staging


def _stage(src: Path, dest: Path):
    return subprocess.Popen([sys.executable, str(ROOT / "tools/stage_shards.py"), str(src), "--dest", str(dest)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_staging_copies_once_per_node_and_then_skips(written, tmp_path):
    procs = [_stage(written, tmp_path / "local") for _ in range(3)]  # three ranks of one node at once
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    staged = tmp_path / "local" / written.name
    assert {out.strip() for out, _ in results} == {str(staged)}
    logs = [err for _, err in results]
    assert sum("stage: copied" in e for e in logs) == 1 and sum("already holds" in e for e in logs) == 2
    for p in written.rglob("*"):
        if p.is_file():
            assert (staged / p.relative_to(written)).read_bytes() == p.read_bytes()
    again = _stage(written, tmp_path / "local").communicate(timeout=60)[1]
    assert again.strip() == f"stage: {staged} already holds {written} ({len(list(written.rglob('*.tar'))) + 2} files)"


def test_a_killed_staging_resumes_with_the_files_it_finished(written, tmp_path):
    local = tmp_path / "local"
    killed("stage_shards", [str(written), "--dest", str(local)], "shards.os.fsync", 4)  # 4th file, before its rename
    staged = local / written.name
    assert not (staged / ".staged.json").exists() and not (staged / "manifest.json").exists()
    assert len(list(staged.rglob("*.tar"))) == 3 and len(list(staged.rglob("*.partial"))) == 1
    log = []
    shards.stage(written, local, log=log.append)
    total = len(json.loads((written / "manifest.json").read_text())["files"])
    assert log[0].startswith(f"stage: copied {total - 3} of {total} files")
    assert not list(staged.rglob("*.partial"))
    for p in written.rglob("*"):
        if p.is_file():
            assert (staged / p.relative_to(written)).read_bytes() == p.read_bytes()


def test_a_full_local_disk_is_one_message_and_nothing_looks_complete(written, tmp_path, monkeypatch):
    with small_disk(tmp_path, "600k") as disk:
        need = sum(f["bytes"] for f in json.loads((written / "manifest.json").read_text())["files"])
        msg = _message(lambda: shards.stage(written, disk, log=lambda m: None))
        assert msg.startswith(f"{disk / written.name}: not enough space to stage {written}: {need / 1e9:.2f} GB to "
                              "copy, 0.00 GB free on that disk")
        # the disk fills up during the copy (another job wrote to it): the same kind of message, no stamp
        monkeypatch.setattr(shards.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
        msg = _message(lambda: shards.stage(written, disk, log=lambda m: None))
        assert msg.startswith(f"{disk / written.name}: no space left on device while staging ")
        assert msg.endswith("the staged set is not marked complete; free space there or stage elsewhere "
                            "(--dest / STAGE_DATA=PATH)")
        assert not (disk / written.name / ".staged.json").exists() and not list(disk.rglob("*.partial"))
        assert not (disk / written.name / "manifest.json").exists()


def test_the_benchmark_counts_one_open_per_file_and_per_shard(toy_data, tmp_path, capsys):
    from bench import shards as bench

    result = bench.main(["--data", str(toy_data), "--images", "300", "--per-shard", "100", "--reps", "1",
                         "--cache", "fadvise", "--work", str(tmp_path)])
    assert result["opens"] == {"folder": 300, "shards": result["shards"]} and result["shards"] == 3
    assert "files opened/epoch" in capsys.readouterr().out


def test_coco_annotations_that_do_not_match_the_shards_are_named(toy_data, tmp_path):
    from data.detection import CocoDetection
    from data.segmentation import CocoVoc, EvalTransform

    out = tmp_path / "coco"
    assert make_shards.main([str(toy_data / "coco"), str(out), "--shard-size", "64KB"]) == 0
    CocoDetection(out, "val", train=False, hflip=0.0, seed=0, data_format="shards")  # as written: accepted
    ann = out / "annotations/instances_val2017.json"
    doc = json.loads(ann.read_text())
    first, second = doc["images"][0], doc["images"][1]  # two images' files swapped: ids no longer match
    first["file_name"], second["file_name"] = second["file_name"], first["file_name"]
    ann.write_text(json.dumps(doc))
    index = json.loads((out / "val2017/index.json").read_text())
    want = dict(zip(index["samples"]["name"], index["samples"]["image_id"]))
    f = min((first, second), key=lambda im: im["id"])["file_name"]  # the annotation order: sorted image ids
    mine = {first["file_name"]: first["id"], second["file_name"]: second["id"]}[f]
    expected = (f"{ann}: 2 image(s) have other ids than in the shard set {out / 'val2017'}, e.g. {f}: id {mine} "
                f"here, {want[f]} in {out / 'val2017/index.json'} (the shards were written from another "
                "annotation file)")
    assert _message(lambda: CocoDetection(out, "val", train=False, hflip=0.0, seed=0, data_format="shards")) == expected
    assert _message(lambda: CocoVoc(out, "val", EvalTransform(48), 0, tmp_path / "masks", "shards")).startswith(
        f"{ann}: 2 image(s) have other ids than in the shard set")


def test_the_index_format_is_version_1_and_another_version_or_kind_is_named(written, tmp_path):
    """docs/shards.md's layout: index.json says format "mbv3-shards", version 1. Sets written today must stay
    readable by later code (a version change is a deliberate, documented step), an index of another
    version is refused, and so is a set of the other kind (ImageFolder vs a COCO split's files)."""
    out = copy_set(written, tmp_path / "set")
    path = out / "val" / "index.json"
    doc = json.loads(path.read_text())
    assert (doc["format"], doc["version"], doc["kind"]) == ("mbv3-shards", 1, "imagefolder")
    assert len(shards.ShardSource(out / "val", "imagefolder").names) == len(doc["samples"]["name"])
    assert _message(lambda: shards.ShardSource(out / "val", "files")) == (
        f"{path}: a shard set of kind 'imagefolder'; this dataset needs 'files' (the images of a COCO split)")
    path.write_text(json.dumps({**doc, "version": 2}))
    assert _message(lambda: shards.ShardSource(out / "val", "imagefolder")) == (
        f"{path}: not a shard index of format 'mbv3-shards' version 1 (found format 'mbv3-shards')")


def test_shards_are_planned_by_tar_bytes_header_and_padding_counted():
    """A tar member costs a 512-byte header and its data padded to 512 bytes: members of 512 bytes cost 1024,
    so three fill a shard of 3072 bytes exactly and the fourth opens the next; a member larger than a shard
    gets a shard of its own."""
    assert shards.plan_shards([512] * 7, 3072) == [range(0, 3), range(3, 6), range(6, 7)]
    assert shards.plan_shards([511, 1, 1024], 2048) == [range(0, 2), range(2, 3)]  # 1024 + 1024, then 1536
    assert shards.plan_shards([5000, 10, 10], 3072) == [range(0, 1), range(1, 3)]
    assert shards.plan_shards([], 3072) == []
    assert shards.plan_shards([1] * 4, 3072) == [range(0, 3), range(3, 4)]  # 1 byte still costs 512 + 512
    assert shards.plan_shards([513] * 3, 3072) == [range(0, 2), range(2, 3)]  # 513 bytes: two data blocks


def test_an_index_reaches_the_disk_before_its_name_does(tmp_path, monkeypatch):
    """Crash safety of every index and manifest write: the bytes are fsynced under the temporary name, then
    renamed, then the directory is fsynced (a power cut leaves the old file or the whole new one)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(shards.os, "fsync", fsync)
    monkeypatch.setattr(shards.os, "replace", replace)
    target = tmp_path / "index.json"
    fds = len(os.listdir("/proc/self/fd"))
    shards._atomic_write(target, b"{}")
    partial = str(target) + ".partial"
    assert events == [("fsync", partial), ("replace", partial, str(target)), ("fsync", str(tmp_path))]
    assert target.read_bytes() == b"{}"
    assert len(os.listdir("/proc/self/fd")) == fds  # the file and the directory are closed again
    sizes = []  # what the disk holds when fsync is asked: all of it, not a part still in a buffer
    monkeypatch.setattr(shards.os, "fsync", lambda fd: (sizes.append(os.fstat(fd).st_size), real_fsync(fd)))
    shards._atomic_write(target, b'{"a": 1}')
    assert sizes[0] == 8 and target.read_bytes() == b'{"a": 1}'


def test_staging_says_how_long_it_waited_for_another_process(written, tmp_path):
    """The copy says what it copied and how long it took; a second caller on a node (another task of the
    job) waits on the lock while the first copies, and when it finds the copy done it says so, with the
    wait."""
    import fcntl
    import threading

    logs = []
    dest = tmp_path / "local"
    staged = shards.stage(written, dest, log=logs.append)
    n = len(json.loads((written / "manifest.json").read_text())["files"])
    [copied] = [line for line in logs if line.startswith("stage: copied")]
    head, tail = copied.split(f" of {written} to {staged} in ")
    assert head.startswith(f"stage: copied {n} of {n} files (") and tail.endswith(" s, SHA-256 checked")
    assert 0 <= float(tail.split()[0]) < 60  # the copy's own duration
    logs.clear()
    lock = open(dest / f".{written.name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process staging: this open file holds the node's lock
    threading.Timer(1.6, lambda: (fcntl.flock(lock, fcntl.LOCK_UN), lock.close())).start()
    assert shards.stage(written, dest, log=logs.append) == staged
    [line] = logs
    head, waited = line.split("; waited ")
    assert head == f"stage: {staged} already holds {written} ({n} files)"
    assert waited.endswith(" s for another process staging it") and 2 <= int(waited.split()[0]) <= 30, line


def test_a_split_whose_index_was_written_is_kept_when_the_writer_resumes(folder, written, tmp_path, capsys):
    """Killed after the train split's index (its last file) and before the val split: the rerun keeps train
    as it is, without re-reading it, writes val, and ends with the uninterrupted writer's set."""
    out = copy_set(written, tmp_path / "set")
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "val")
    train_files = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    capsys.readouterr()
    assert make_shards.main([str(folder), str(out), "--shard-size", "64KB"]) == 0
    assert f"{out / 'train'}: complete (index.json present), kept" in capsys.readouterr().out.splitlines()
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()} == train_files
    assert (out / "manifest.json").read_bytes() == (written / "manifest.json").read_bytes()


def test_a_reader_keeps_at_most_max_open_shards_open_closing_the_least_recently_used(written, monkeypatch):
    """ImageNet has ~150 shards, under the limit; a set with more than MAX_OPEN (here 2 of the toy set's
    shards) still reads every sample right, with no more than MAX_OPEN descriptors held."""
    src = shards.ShardSource(written / "train", "imagefolder")
    assert len(src.files) >= 3
    monkeypatch.setattr(shards, "MAX_OPEN", 2)
    for i in range(len(src)):
        assert src.read(i) == (Path(src.files[int(src._shard[i])]).read_bytes()
                               [int(src._offset[i]):int(src._offset[i]) + int(src._length[i])])
        assert len(src._fds) <= 2
        held = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in src._fds.values()}
        assert held <= {os.path.realpath(f) for f in src.files} and len(held) == len(src._fds)
    last = int(src._shard[len(src) - 1])
    assert list(src._fds)[-1] == last  # the most recently used stays open


def test_the_writer_reports_every_tenth_shard_and_the_last(folder, tmp_path, capsys):
    """A shard per sample (1 KB: smaller than any toy image with its header): progress lines after shards
    10, 20, ... and after the last one, each with the samples written so far."""
    out = tmp_path / "set"
    capsys.readouterr()
    assert make_shards.main([str(folder), str(out), "--shard-size", "1KB"]) == 0
    n = len(json.loads((out / "train" / "index.json").read_text())["samples"]["name"])
    assert n > 10
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{out / 'train'}: ")
             and " shards, " in line]
    want = sorted(set(list(range(10, n + 1, 10)) + [n]))
    assert [line.split(": ")[1].split(" shards, ")[0] for line in lines] == [f"{k}/{n}" for k in want]
    assert [int(line.split(" shards, ")[1].split()[0]) for line in lines] == want  # one sample per shard


def test_a_missing_index_says_to_read_a_folder_of_images_only_when_the_split_folder_exists(folder, tmp_path):
    """data.format=shards on an ImageFolder root: its split folder exists but holds images, so the message
    says to set data.format=folder; a split folder that is not there at all gets no such hint."""
    assert _message(lambda: shards.load_index(folder / "train")) == (
        f"{folder / 'train/index.json'}: shard index not found; data.format shards expects data.root/train/index.json "
        "as tools/make_shards.py writes it (it holds image files: set data.format=folder)")
    assert _message(lambda: shards.load_index(tmp_path / "val")) == (
        f"{tmp_path / 'val/index.json'}: shard index not found; data.format shards expects data.root/val/index.json "
        "as tools/make_shards.py writes it")


def test_a_pickled_reader_reads_the_same_bytes_with_its_own_lock_and_descriptors(folder, written):
    """DataLoader workers get the reader pickled (spawn) while the parent may hold its lock (the val check
    reads from threads): the copy starts unlocked, with no descriptors of the parent's, and reads the
    folder's bytes through descriptors it opens itself."""
    import pickle

    src = shards.ShardSource(written / "val", "imagefolder")
    last = len(src) - 1
    assert src.read(last) == (folder / "val" / src.names[last]).read_bytes()
    src.index_of(src.name(0))
    with src._lock:  # held while pickling: the copy must not inherit a held lock
        clone = pickle.loads(pickle.dumps(src))
    assert clone._lock is not src._lock and not clone._lock.locked()
    assert len(clone._fds) == 0 and clone._by_name is None
    assert clone.names == src.names and clone.files == src.files
    assert clone.read(last) == src.read(last) == (folder / "val" / src.names[last]).read_bytes()
    shard = int(src._shard[last])
    assert list(clone._fds) == [shard] and clone._fds[shard] != src._fds[shard]
    assert os.path.realpath(f"/proc/self/fd/{clone._fds[shard]}") == os.path.realpath(src.files[shard])
    assert clone.index_of(src.name(last)) == last


def test_annotation_images_the_shards_do_not_hold_are_named_with_their_count(written, tmp_path):
    """An annotation file that lists images absent from the shard set (written from another annotation
    file): one message with the annotation file, how many are absent, the shard folder and the first absent
    name in the annotation's order; images that are all held map to their sample positions."""
    src = shards.ShardSource(written / "val", "imagefolder")
    ann = tmp_path / "instances_val2017.json"
    assert src.match([src.names[2], src.names[0]], [7, 8], ann) == [2, 0]
    files = [src.names[0], "n0/absent_first.jpg", src.names[1], "n0/absent_second.jpg"]
    assert _message(lambda: src.match(files, [1, 2, 3, 4], ann)) == (
        f"{ann}: lists 2 image(s) that the shard set {written / 'val'} does not hold, e.g. n0/absent_first.jpg "
        "(were the shards written from another annotation file?)")


def test_verification_names_a_truncated_and_a_grown_shard_and_logs_what_it_checked(folder, written, tmp_path):
    out = copy_set(written, tmp_path / "set")
    val = out / "val"
    logs = []
    shards.verify_set(val, log=logs.append)
    n_shards = len(list(val.glob("shard-*.tar")))
    n_samples = len(list((folder / "val").rglob("*.jpg")))
    assert n_shards > 1 and logs == [f"{val}: {n_shards} shards, {n_samples} samples: sizes and SHA-256 match the "
                                     "index"]
    first = val / "shard-00000.tar"
    data = first.read_bytes()
    first.write_bytes(data[:-100])
    assert _message(lambda: shards.verify_set(val, log=logs.append)) == (
        f"{first}: shard truncated: {len(data) - 100} bytes, its index says {len(data)}")
    first.write_bytes(data + b"\0" * 512)
    assert _message(lambda: shards.verify_set(val, log=logs.append)) == (
        f"{first}: shard resized: {len(data) + 512} bytes, its index says {len(data)}")
    assert len(logs) == 1  # a failed verification logs no success line


def test_a_rewrite_with_fewer_shards_removes_the_shards_of_the_earlier_plan(tmp_path):
    """A writer killed before its index, rerun after a source file was removed: the new plan has fewer
    shards; the one the new index does not list is deleted, the others stay and hold the new samples."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    files = []
    for k in range(3):  # 1000 bytes: a 512-byte header + 1024 padded = 1536, one sample per 1536-byte shard
        (src_dir / f"{k}.bin").write_bytes(bytes([k]) * 1000)
        files.append(str(src_dir / f"{k}.bin"))
    out = tmp_path / "set" / "train"
    names = [f"c/{k}.bin" for k in range(3)]
    shards.write_set(out, names, files, [0, 0, 0], ["c"], shard_bytes=1536, log=lambda m: None)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-00000.tar", "shard-00001.tar",
                                                              "shard-00002.tar"]
    (out / "index.json").unlink()  # killed before the index (the last file of a split)
    shards.write_set(out, names[:2], files[:2], [0, 0], ["c"], shard_bytes=1536, log=lambda m: None)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    reader = shards.ShardSource(out, "imagefolder")
    assert [reader.read(i) for i in range(len(reader))] == [bytes([0]) * 1000, bytes([1]) * 1000]


def test_the_default_stage_dir_is_slurms_local_folder_or_tmp_named_by_user_or_uid(monkeypatch):
    """$SLURM_TMPDIR when SLURM sets it (an empty value counts as unset), else /tmp; the folder is named by
    $USER, or by the uid where USER is not set (containers, cron)."""
    monkeypatch.setenv("SLURM_TMPDIR", "/local/job42")
    monkeypatch.setenv("USER", "alice")
    assert shards.default_stage_dir() == Path("/local/job42/mbv3-shards-alice")
    monkeypatch.setenv("SLURM_TMPDIR", "")
    assert shards.default_stage_dir() == Path("/tmp/mbv3-shards-alice")
    monkeypatch.delenv("SLURM_TMPDIR")
    monkeypatch.delenv("USER")
    assert shards.default_stage_dir() == Path(f"/tmp/mbv3-shards-{os.getuid()}")


# ----------------------------------------------------------------------------- hand-made sets and roots


def _hand_made_set(split: Path, shard_blobs: list[list[bytes]], classes: list[str] | None = None,
                   labels: list[int] | None = None) -> dict:
    """A shard set written here from docs/shards.md's index format, not by the writer: shard k holds its
    samples' bytes back to back (the reader goes by the index's byte ranges, it does not parse the tar), sample
    names s<k>_<j>.bin; kind "imagefolder" with classes and labels, else "files" with image ids 0, 1, ..."""
    split.mkdir(parents=True, exist_ok=True)
    entries, samples = [], {"name": [], "shard": [], "offset": [], "length": []}
    for k, blobs in enumerate(shard_blobs):
        data = b"".join(blobs)
        (split / f"shard-{k:05d}.tar").write_bytes(data)
        entries.append({"file": f"shard-{k:05d}.tar", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "samples": len(blobs)})
        pos = 0
        for j, blob in enumerate(blobs):
            for key, value in (("name", f"s{k}_{j}.bin"), ("shard", k), ("offset", pos), ("length", len(blob))):
                samples[key].append(value)
            pos += len(blob)
    if classes is None:
        samples["image_id"] = list(range(len(samples["name"])))
    else:
        samples["label"] = labels
    doc = {"format": "mbv3-shards", "version": 1, "kind": "files" if classes is None else "imagefolder",
           "classes": classes, "shards": entries, "samples": samples}
    (split / "index.json").write_text(json.dumps(doc))
    return doc


def _hand_made_root(root: Path, files: dict[str, bytes | int]) -> Path:
    """A shard root's manifest.json as docs/shards.md describes it (path, bytes, SHA-256 per file); a value
    that is a number is a size listed in the manifest for a file that is not written."""
    listed = []
    for rel, data in files.items():
        if isinstance(data, int):
            listed.append({"path": rel, "bytes": data, "sha256": "0" * 64})
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        listed.append({"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"format": "mbv3-shards", "version": 1, "splits": [],
                                                    "files": listed}))
    return root


def test_an_index_in_the_documented_format_is_read_with_ranges_from_byte_0_to_the_shards_end(tmp_path):
    """Byte ranges at the edges are valid: a sample at offset 0, an empty sample, a sample ending on the
    shard's last byte; an empty set opens with no samples; a COCO-style set ("files") has image ids and no
    labels."""
    split = tmp_path / "val"
    _hand_made_set(split, [[b"abc", b"", b"defgh"], [b"ij"]], classes=["a", "b"], labels=[0, 1, 1, 0])
    src = shards.ShardSource(split, "imagefolder")
    assert [src.read(i) for i in range(len(src))] == [b"abc", b"", b"defgh", b"ij"]
    assert src.names == ["s0_0.bin", "s0_1.bin", "s0_2.bin", "s1_0.bin"] and src.labels.tolist() == [0, 1, 1, 0]
    assert src.classes == ["a", "b"] and src.image_ids is None
    _hand_made_set(tmp_path / "files", [[b"x", b"yz"]])
    coco = shards.ShardSource(tmp_path / "files", "files")
    assert coco.image_ids.tolist() == [0, 1] and coco.labels is None and coco.read(1) == b"yz"
    for kind, classes in (("imagefolder", ["a"]), ("files", None)):
        _hand_made_set(tmp_path / f"empty_{kind}", [], classes=classes, labels=[])
        assert len(shards.ShardSource(tmp_path / f"empty_{kind}", kind)) == 0


def test_every_kind_of_damaged_index_is_named_with_what_is_wrong(tmp_path):
    split = tmp_path / "val"
    good = _hand_made_set(split, [[b"abc", b"", b"defgh"], [b"ij"]], classes=["a", "b"], labels=[0, 1, 1, 0])
    path = split / "index.json"

    def damaged(**samples) -> str:
        path.write_text(json.dumps({**good, "samples": {**good["samples"], **samples}}))
        return _message(lambda: shards.load_index(split))

    nowhere = f"{path}: damaged shard index: a sample refers to a shard it does not list"
    assert damaged(shard=[0, 0, 0, 2]) == nowhere  # 2 shards: 0 and 1
    assert damaged(shard=[-1, 0, 0, 1]) == nowhere
    assert damaged(offset=[0, 3, 3, -1]) == (
        f"{path}: damaged shard index: sample s1_0.bin at offset -1, 2 bytes, lies outside shard-00001.tar (2 bytes)")
    assert damaged(length=[3, -1, 5, 2]) == (
        f"{path}: damaged shard index: sample s0_1.bin at offset 3, -1 bytes, lies outside shard-00000.tar (8 bytes)")
    assert damaged(offset=[0, 3, 4, 1]) == (  # two samples past their shard's end: the first is named
        f"{path}: damaged shard index: sample s0_2.bin at offset 4, 5 bytes, lies outside shard-00000.tar (8 bytes)")
    assert damaged(label=[0, 1, 2, 0]) == f"{path}: damaged shard index: labels outside its 2 classes"
    assert damaged(label=[0, -1, 1, 0]) == f"{path}: damaged shard index: labels outside its 2 classes"
    assert damaged(label=[0, 1, 1]) == f"{path}: damaged shard index: its sample lists have different lengths"
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "shards"}))
    assert _message(lambda: shards.load_index(split)) == (
        f"{path}: damaged shard index (missing or mistyped 'shards'); rewrite the set with tools/make_shards.py")
    for doc, found in (({**good, "format": "webdataset"}, "'webdataset'"), ([good], "None")):
        path.write_text(json.dumps(doc))
        assert _message(lambda: shards.load_index(split)) == (
            f"{path}: not a shard index of format 'mbv3-shards' version 1 (found format {found})")
    path.write_bytes(b"{")
    with pytest.raises(ValueError) as exc:  # the JSON parser's own words
        json.loads(b"{")
    assert _message(lambda: shards.load_index(split)) == (
        f"{path}: unreadable shard index ({exc.value}); expected the JSON tools/make_shards.py writes")


def test_a_reader_names_an_absent_set_a_grown_shard_and_a_set_of_the_other_kind(tmp_path):
    assert _message(lambda: shards.ShardSource(tmp_path / "val2017", "files")) == (
        f"{tmp_path / 'val2017'}: shard set not found (data.format shards expects data.root/val2017/ as "
        "tools/make_shards.py writes it)")
    _hand_made_set(tmp_path / "val2017", [[b"abc"]])
    assert _message(lambda: shards.ShardSource(tmp_path / "val2017", "imagefolder")) == (
        f"{tmp_path / 'val2017/index.json'}: a shard set of kind 'files'; this dataset needs 'imagefolder' "
        "(an ImageFolder split)")
    shard = tmp_path / "val2017/shard-00000.tar"
    shard.write_bytes(b"abcd")
    assert _message(lambda: shards.ShardSource(tmp_path / "val2017", "files")) == (
        f"{shard}: shard longer than its index says: 4 bytes, but {tmp_path / 'val2017/index.json'} says 3; the "
        "shard and its index do not match (copy the set again, or rewrite it)")


def test_a_split_is_read_as_shards_or_as_a_folder_as_data_format_says(folder, written):
    assert shards.open_split(folder / "val", "folder", "imagefolder") is None  # the folder's own files
    src = shards.open_split(written / "val", "shards", "imagefolder")
    assert src.names == sorted(str(p.relative_to(folder / "val")) for p in (folder / "val").rglob("*.jpg"))
    assert _message(lambda: shards.open_split(written / "val", "folder", "imagefolder")) == (
        f"{written / 'val'}: a shard set (it holds index.json), read as a folder of images; set data.format=shards")


def test_a_sample_opened_by_name_reads_and_seeks_like_the_file_itself(folder, written):
    """engine.datacheck reads headers and ends of val images through ShardSource.open: the member must behave
    as the original file opened with open() (buffered) and io.FileIO (raw), offsets counted from the sample."""
    src = shards.ShardSource(written / "val", "imagefolder")
    i = 1
    original = folder / "val" / src.names[i]
    size = original.stat().st_size
    ops = [("read", 3), ("tell",), ("seek", 10, 0), ("read", 5), ("seek", 700, 1), ("read", 4), ("seek", -6, 2),
           ("read", -1), ("read", 10), ("tell",), ("seek", 0, 0), ("read", -1)]
    with src.open(src.name(i)) as member, open(original, "rb") as ref:
        assert [getattr(member, op)(*args) for op, *args in ops] == [getattr(ref, op)(*args) for op, *args in ops]
    raw_ops = [("seek", 5), ("read", 4), ("tell",), ("seek", 3, 1), ("read", 2), ("seek", -3, 2), ("read", 10),
               ("read", 10), ("seek", size + 50), ("read", 4), ("seek", 0), ("read", 6), ("readable",), ("seekable",)]
    raw = src.open(src.name(i)).raw
    with io.FileIO(original) as ref:
        assert [getattr(raw, op)(*args) for op, *args in raw_ops] == [getattr(ref, op)(*args) for op, *args in raw_ops]


def test_a_reader_closes_the_least_recently_used_shard_not_the_first_opened(written, monkeypatch):
    src = shards.ShardSource(written / "train", "imagefolder")
    first = [src._shard.tolist().index(k) for k in range(3)]  # a sample of each of shards 0, 1, 2
    monkeypatch.setattr(shards, "MAX_OPEN", 2)
    for k in (0, 1, 0):
        src.read(first[k])
    fd1 = src._fds[1]
    src.read(first[2])  # shard 1 is the least recently used when shard 2 opens
    assert list(src._fds) == [0, 2]
    assert [os.path.realpath(f"/proc/self/fd/{fd}") for fd in src._fds.values()] == [
        os.path.realpath(src.files[k]) for k in (0, 2)]
    assert os.path.realpath(f"/proc/self/fd/{fd1}") != os.path.realpath(src.files[1])  # closed, not leaked


def test_a_reader_keeps_256_shards_open_at_most(tmp_path):
    """The documented bound (a few hundred shards; ImageNet's ~150 all stay open): a set of 257 shards read in
    order holds the 256 most recent ones."""
    _hand_made_set(tmp_path / "val2017", [[bytes([k % 256])] for k in range(257)])
    src = shards.ShardSource(tmp_path / "val2017", "files")
    assert [src.read(i) for i in range(257)] == [bytes([k % 256]) for k in range(257)]
    assert sorted(src._fds) == list(range(1, 257))
    held = [fd for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}").startswith(os.path.realpath(tmp_path / "val2017"))]
    assert len(held) == 256
    for fd in src._fds.values():
        os.close(fd)


def _sources(tmp_path: Path, n: int, size: int = 1000) -> tuple[list[str], list[str]]:
    """n source files of `size` bytes (1000: a 512-byte tar header + 1024 padded, one per shard of 1536 bytes)."""
    (tmp_path / "src").mkdir()
    files = []
    for k in range(n):
        (tmp_path / "src" / f"{k}.bin").write_bytes(bytes([k + 1]) * size)
        files.append(str(tmp_path / "src" / f"{k}.bin"))
    return [f"c/{k}.bin" for k in range(n)], files


def test_shards_are_pax_tars_of_mode_0644_and_mtime_0_and_a_resumed_writer_keeps_them_and_clears_leftovers(
        tmp_path):
    """docs/shards.md's layout: members named as in the folder, mtime 0, mode 0644, read back by tarfile. A
    writer killed before its index: the rerun keeps the finished shards (and says so), and removes the
    temporary files it left, including one of a shard the new plan does not have."""
    names, files = _sources(tmp_path, 2)
    out = tmp_path / "set" / "train"
    shards.write_set(out, names, files, [0, 0], ["c"], shard_bytes=1536, log=lambda m: None)
    for k in range(2):
        path = out / f"shard-{k:05d}.tar"
        assert path.stat().st_size == 10240  # one member (512 + 1024), the end blocks, padded to a tar record
        with tarfile.open(path) as tar:
            [m] = tar.getmembers()
            assert (m.name, m.size, m.mode, m.mtime, m.isfile()) == (names[k], 1000, 0o644, 0, True)
            assert tar.extractfile(m).read() == bytes([k + 1]) * 1000
    (out / "index.json").unlink()
    (out / "shard-00007.tar.partial").write_bytes(b"half")
    (out / "index.json.partial").write_bytes(b"{")
    inodes = [(out / f"shard-{k:05d}.tar").stat().st_ino for k in range(2)]
    logs = []
    shards.write_set(out, names, files, [0, 0], ["c"], shard_bytes=1536, log=logs.append)
    assert logs[:2] == [f"{out / 'shard-00000.tar'}: written by an earlier run, checked, kept",
                        f"{out / 'shard-00001.tar'}: written by an earlier run, checked, kept"]
    assert logs[2].startswith(f"{out}: 2/2 shards, 2 samples, ") and len(logs) == 3
    assert [(out / f"shard-{k:05d}.tar").stat().st_ino for k in range(2)] == inodes
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.tar", "shard-00001.tar"]


def test_shards_and_staged_files_reach_the_disk_whole_before_their_names_do(tmp_path, monkeypatch):
    """Each shard is fsynced complete under its temporary name, then renamed; so is each file staged, then
    the manifest, then the stamp (a stamp on disk before the manifest would mark a set complete whose
    manifest a power cut could leave empty). (A power cut leaves a temporary file, redone, never a short file under a final name.) A sample
    of 8704 bytes (17 blocks) fills a tar record exactly with its header and the two end blocks: 10240 bytes."""
    names, files = _sources(tmp_path, 2, size=8704)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, None if os.path.isdir(path) else os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(shards.os, "fsync", fsync)
    monkeypatch.setattr(shards.os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                             real_replace(a, b)))
    out = tmp_path / "set" / "train"
    shards.write_set(out, names, files, [0, 0], ["c"], shard_bytes=9216, log=lambda m: None)
    p0, p1, index = (str(out / n) for n in ("shard-00000.tar", "shard-00001.tar", "index.json"))
    assert events == [("fsync", p0 + ".partial", 10240), ("replace", p0 + ".partial", p0),
                      ("fsync", p1 + ".partial", 10240), ("replace", p1 + ".partial", p1),
                      ("fsync", index + ".partial", (out / "index.json").stat().st_size),
                      ("replace", index + ".partial", index), ("fsync", str(out), None)]
    root = _hand_made_root(tmp_path / "root", {"a.bin": b"a" * 3000, "b/c.bin": b"c" * 5})
    events.clear()
    dest = shards.stage(root, tmp_path / "local", log=lambda m: None)
    a, c, stamp = str(dest / "a.bin"), str(dest / "b/c.bin"), str(dest / ".staged.json")
    manifest = str(dest / shards.MANIFEST)
    assert events == [("fsync", a + ".partial", 3000), ("replace", a + ".partial", a),
                      ("fsync", c + ".partial", 5), ("replace", c + ".partial", c),
                      ("fsync", manifest + ".partial", (root / shards.MANIFEST).stat().st_size),
                      ("replace", manifest + ".partial", manifest), ("fsync", str(dest), None),
                      ("fsync", stamp + ".partial", (dest / ".staged.json").stat().st_size),
                      ("replace", stamp + ".partial", stamp), ("fsync", str(dest), None)]


def test_a_shard_that_reads_back_other_than_written_is_refused(tmp_path, monkeypatch):
    """The read-back check: the disk returns other bytes than the writer wrote (here changed under the file
    system's feet right at fsync): one byte of a sample flipped (same size, other SHA-256), or the shard
    cut short."""
    names, files = _sources(tmp_path, 1)
    out = tmp_path / "set" / "train"
    real_fsync = os.fsync
    for damage in (lambda fd: os.pwrite(fd, b"\xff", 600), lambda fd: os.ftruncate(fd, 9728)):
        monkeypatch.setattr(shards.os, "fsync", lambda fd, damage=damage: (damage(fd), real_fsync(fd)))
        tmp = out / "shard-00000.tar.partial"
        assert _message(lambda: shards.write_set(out, names, files, [0], ["c"], shard_bytes=1536,
                                                 log=lambda m: None)) == (
            f"{tmp}: the shard read back differs from what was written (size or SHA-256): the disk or file system "
            "lost data; run the writer again")
        assert not (out / "shard-00000.tar").exists() and not (out / "index.json").exists()


def test_the_default_shard_size_is_1_gib(monkeypatch):
    """docs/shards.md: `--shard-size` (default `1GB`), 1 GB in the tool's units being 2**30 bytes."""
    seen = []
    monkeypatch.setattr(make_shards, "write", lambda src, out, shard_bytes: seen.append(shard_bytes))
    assert make_shards.main(["src", "out"]) == 0
    assert seen == [make_shards.parse_size("1GB")] == [1 << 30]


# ----------------------------------------------------------------------------- staging: errors and re-checks


def test_a_staging_folder_removed_during_the_copy_is_named_not_blamed_on_the_source(written, tmp_path,
                                                                                     monkeypatch):
    """Someone removes the staging folder while a file is copied: the copy cannot be written there. That is
    the destination's problem, said as such; the source set is complete and must not be called incomplete."""
    real = shards._copy_checked
    local = tmp_path / "local"
    dest = local / written.name

    def removed_first(src, dst, size, digest):
        shutil.rmtree(dst.parent)
        return real(src, dst, size, digest)

    monkeypatch.setattr(shards, "_copy_checked", removed_first)
    rel = json.loads((written / "manifest.json").read_text())["files"][0]["path"]
    assert _message(lambda: shards.stage(written, local, log=lambda m: None)) == (
        f"{dest / rel}: cannot stage (No such file or directory)")
    assert not (dest / ".staged.json").exists()


def test_a_failed_write_while_staging_leaves_no_temporary_file_and_no_stamp(written, tmp_path, monkeypatch):
    """A disk error (EIO) while a file is copied, and a full disk (ENOSPC) while the stamp itself is written
    (the last step, everything copied): each one message, no temporary file, nothing marked complete."""
    real_fsync = os.fsync
    local = tmp_path / "local"
    dest = local / written.name

    def failing(suffix, err):
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
                raise OSError(err, os.strerror(err))
            real_fsync(fd)
        return fsync

    rel = json.loads((written / "manifest.json").read_text())["files"][0]["path"]
    monkeypatch.setattr(shards.os, "fsync", failing(".tar.partial", errno.EIO))
    assert _message(lambda: shards.stage(written, local, log=lambda m: None)) == (
        f"{dest / rel}: cannot stage (Input/output error)")
    assert not list(dest.rglob("*.partial")) and not (dest / ".staged.json").exists()
    monkeypatch.setattr(shards.os, "fsync", failing(".staged.json.partial", errno.ENOSPC))
    need = sum(f["bytes"] for f in json.loads((written / "manifest.json").read_text())["files"])
    assert need < 5e6  # so both amounts read 0.00 GB
    assert _message(lambda: shards.stage(written, local, log=lambda m: None)) == (
        f"{dest}: no space left on device while staging manifest.json (0.00 GB of 0.00 GB copied); the staged set "
        "is not marked complete; free space there or stage elsewhere (--dest / STAGE_DATA=PATH)")
    assert not list(dest.rglob("*.partial")) and not list(dest.glob(".staged.json*"))


def test_a_staged_copy_without_its_stamp_or_a_file_is_completed_and_stamped_again(written, tmp_path):
    """The stamp holds the manifest's SHA-256 and the source; a staged copy missing it (killed after the last
    file), with the stamp of another manifest, or missing one file, is checked and completed, copying only
    what is missing; a re-stage that fails leaves the copy unstamped."""
    src = copy_set(written, tmp_path / "set").resolve()
    manifest = json.loads((src / "manifest.json").read_text())
    n = len(manifest["files"])
    local = tmp_path / "local"
    logs = []
    dest = shards.stage(src, local, log=logs.append)
    stamp = dest / ".staged.json"
    want = {"manifest_sha256": hashlib.sha256((src / "manifest.json").read_bytes()).hexdigest(), "source": str(src)}
    assert json.loads(stamp.read_text()) == want
    for damage in (stamp.unlink, lambda: stamp.write_text(json.dumps({**want, "manifest_sha256": "0" * 64}))):
        damage()
        logs.clear()
        shards.stage(src, local, log=logs.append)
        assert logs[0].startswith(f"stage: copied 0 of {n} files (0.00 GB) of {src} to {dest} in ")
        assert json.loads(stamp.read_text()) == want
    rel = manifest["files"][0]["path"]
    (dest / rel).unlink()
    logs.clear()
    shards.stage(src, local, log=logs.append)
    assert logs[0].startswith(f"stage: copied 1 of {n} files (0.00 GB) of {src} to {dest} in ")
    assert (dest / rel).read_bytes() == (src / rel).read_bytes() and json.loads(stamp.read_text()) == want
    (dest / rel).unlink()
    data = (src / rel).read_bytes()
    (src / rel).write_bytes(data[:700] + bytes([data[700] ^ 0xFF]) + data[701:])  # the source damaged since
    assert _message(lambda: shards.stage(src, local, log=lambda m: None)).startswith(f"{src / rel}: corrupted (")
    assert not stamp.exists()


def test_staging_checks_the_space_in_gb_before_copying_and_reports_what_it_copied(tmp_path, monkeypatch):
    """A set of 2,345,678,901 bytes (listed, not written): 2.35 GB to copy; 1 GB free is refused before any
    copy, exactly enough is not (the copy then finds the file missing). A copy of 4,999,999 bytes is
    reported as 0.00 GB; a file two folders down is staged at its place."""
    big = _hand_made_root(tmp_path / "big", {"train/shard-00000.tar": 2_345_678_901}).resolve()
    local = tmp_path / "local"
    for free in (1_000_000_000, 2_345_678_901):
        monkeypatch.setattr(shards.shutil, "disk_usage", lambda p, free=free: shutil._ntuple_diskusage(
            1 << 42, (1 << 42) - free, free))
        msg = _message(lambda: shards.stage(big, local, log=lambda m: None))
        if free < 2_345_678_901:
            assert msg == (f"{local / 'big'}: not enough space to stage {big}: 2.35 GB to copy, 1.00 GB free on that "
                           "disk; free space there or stage elsewhere (--dest / STAGE_DATA=PATH)")
        else:
            assert msg == (f"{big / 'train/shard-00000.tar'}: missing (listed in {big / 'manifest.json'}); the shard "
                           "set is incomplete: rewrite it with tools/make_shards.py")
    monkeypatch.undo()
    data = os.urandom(4_999_999)
    root = _hand_made_root(tmp_path / "root", {"train/deep/a.bin": data}).resolve()
    logs = []
    dest = shards.stage(root, local, log=logs.append)
    [line] = logs
    assert line.startswith(f"stage: copied 1 of 1 files (0.00 GB) of {root} to {dest} in ")
    assert line.endswith(" s, SHA-256 checked")
    assert (dest / "train/deep/a.bin").read_bytes() == data
