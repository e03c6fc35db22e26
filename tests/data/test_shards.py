"""data/shards.py, tools/make_shards.py and tools/stage_shards.py on real files.

Oracles: the source files themselves (every sample's bytes), GNU tar (extracts the shards to the same
files), an order computed here with sorted os.listdir, sha256sum, a real tmpfs for the full disk."""

import hashlib
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
    shards._atomic_write(target, b"{}")
    partial = str(target) + ".partial"
    assert events == [("fsync", partial), ("replace", partial, str(target)), ("fsync", str(tmp_path))]
    assert target.read_bytes() == b"{}"


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
