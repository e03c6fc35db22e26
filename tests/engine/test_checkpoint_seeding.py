import os
import random

import numpy as np
import pytest
import torch

from engine import checkpoint, seeding


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "ck.pt"
    checkpoint.save(checkpoint.new({"w": torch.ones(2)}, epoch=1), target)
    before = target.read_bytes()

    def boom(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        checkpoint.save(checkpoint.new({"w": torch.zeros(2)}, epoch=2), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_checkpoint_loads_weights_only_and_rejects_foreign_versions(tmp_path):
    checkpoint.save(checkpoint.new({"w": torch.ones(1)}, epoch=0, rng=[seeding.rng_state()]), tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["epoch"] == 0
    torch.save({"format": checkpoint.FORMAT, "version": 99, "model": {}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        checkpoint.load(tmp_path / "b.pt")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    seeding.seed_everything(3)
    checkpoint.save({"rng": seeding.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seeding.seed_everything(99)
    seeding.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_sample_seed_mixes_each_part():
    seeds = {seeding.sample_seed(0, e, i) for e in range(20) for i in range(500)}
    assert len(seeds) == 10_000
    assert seeding.sample_seed(1, 0, 0) != seeding.sample_seed(0, 1, 0) != seeding.sample_seed(0, 0, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_a_full_disk_is_one_error_naming_the_file_and_no_temp_file_stays(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "ck.pt"
    real_save = torch.save

    def enospc(obj, fh):  # as torch.save reports it: a RuntimeError with the OSError chained
        real_save({"w": torch.ones(1000)}, fh)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4050") from exc

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(checkpoint.NoSpace) as err:
        checkpoint.save(checkpoint.new({"w": torch.zeros(2)}, epoch=2), target)
    assert str(err.value) == f"no space left on device while writing {target}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoint.atomic_write_text(tmp_path / "a.json", "{}\n")
        checkpoint.save(checkpoint.new({"w": torch.ones(1)}), tmp_path / "b.pt")
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o666 & ~umask, "b.pt": 0o666 & ~umask, "plain": 0o666 & ~umask}


def test_the_umask_is_read_without_proc_too_and_left_as_it_was(monkeypatch):
    """Where /proc/self/status is missing (macOS), the umask is read by setting it and putting it back."""
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", no_proc, raising=False)
    old = os.umask(0o027)
    try:
        assert checkpoint.file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # still the process's umask
    finally:
        os.umask(old)


def test_state_digest_covers_names_dtypes_shapes_and_bytes(tmp_path):
    state = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.zeros(3)}
    digest = checkpoint.state_sha256(state)
    assert len(digest) == 64 and checkpoint.state_sha256({k: v.clone() for k, v in state.items()}) == digest
    checkpoint.save(checkpoint.new(state), tmp_path / "s.pt")
    assert checkpoint.state_sha256(checkpoint.load(tmp_path / "s.pt")["model"]) == digest
    variants = [
        {"b.weight": state["a.weight"], "a.bias": state["a.bias"]},            # a name
        {"a.weight": state["a.weight"].reshape(3, 2), "a.bias": state["a.bias"]},  # a shape
        {"a.weight": state["a.weight"].view(torch.int32), "a.bias": state["a.bias"]},  # a dtype, same bytes
        {"a.weight": state["a.weight"] + 1, "a.bias": state["a.bias"]},         # the values
        {"a.weight": state["a.weight"], "a.bias": torch.zeros(0)},              # an empty tensor
    ]
    digests = {checkpoint.state_sha256(v) for v in variants}
    assert len(digests) == len(variants) and digest not in digests


def test_prune_keeps_the_newest_epoch_files(tmp_path):
    names = [f"epoch_{e:03d}.pt" for e in (0, 1, 2, 10, 11)] + ["last.pt"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    checkpoint.prune(tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    checkpoint.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_010.pt", "epoch_011.pt", "last.pt"]
    checkpoint.prune(tmp_path, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_preemption_handlers_are_put_back_and_a_default_sigusr1_becomes_ignored():
    import signal

    from engine.preemption import Preemption

    def mine(signum, frame):
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        signal.signal(signal.SIGTERM, mine)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # default: SLURM's time-limit warning would kill the process
        p = Preemption(False)
        assert signal.getsignal(signal.SIGTERM) == p._handle and signal.getsignal(signal.SIGUSR1) == p._handle
        p.restore()
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == saved[signal.SIGINT]
        signal.signal(signal.SIGUSR1, mine)  # a handler of the caller's own is put back as it was
        p = Preemption(False)
        p.restore()
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_plain_state_dicts_and_reference_script_checkpoints_load_as_weights(tmp_path):
    sd = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 599}, tmp_path / "reference.pth")
    for name in ("plain.pth", "reference.pth"):
        loaded = checkpoint.load(tmp_path / name)
        assert list(loaded) == ["model"] and checkpoint.state_sha256(loaded["model"]) == checkpoint.state_sha256(sd)
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a state dict nor a project checkpoint"):
        checkpoint.load(tmp_path / "other.pth")


def test_last_pt_falls_back_to_a_second_save_where_a_hard_link_fails(tmp_path, monkeypatch):
    """link_or_save makes last.pt the epoch's checkpoint: a hard link, or (file systems without links, a
    rename that fails) an atomic second save; either way no temporary file stays."""
    obj = checkpoint.new({"w": torch.arange(4.0)}, epoch=3, config={})
    src, dst = tmp_path / "epoch_003.pt", tmp_path / "last.pt"
    checkpoint.save(obj, src)
    (tmp_path / ".last.pt.link.tmp").write_bytes(b"left by a process killed mid-link")
    checkpoint.link_or_save(src, dst, obj)
    assert os.stat(dst).st_ino == os.stat(src).st_ino  # linked (the stale temporary removed first): no second write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_003.pt", "last.pt"]

    def no_links(a, b):
        raise OSError(1, "Operation not permitted")

    dst.unlink()
    monkeypatch.setattr(checkpoint.os, "link", no_links)
    checkpoint.link_or_save(src, dst, obj)
    assert os.stat(dst).st_ino != os.stat(src).st_ino and torch.equal(checkpoint.load(dst)["model"]["w"], torch.arange(4.0))
    monkeypatch.undo()

    real_replace, calls = os.replace, []

    def first_replace_fails(a, b):  # the link is made, its rename onto last.pt fails
        calls.append(a)
        if len(calls) == 1:
            raise OSError(18, "Invalid cross-device link")
        real_replace(a, b)

    dst.unlink()
    monkeypatch.setattr(checkpoint.os, "replace", first_replace_fails)
    checkpoint.link_or_save(src, dst, obj)
    assert checkpoint.load(dst)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_003.pt", "last.pt"]


def test_sample_seeds_are_those_of_every_earlier_run():
    """Per-sample seeds must never change between versions: a run resumed with newer code, and a published
    run repeated, augment every image as before. Golden values of splitmix64 over (seed, epoch, index),
    63 bits (a torch seed)."""
    assert seeding.sample_seed(0, 0, 0) == 1279368494785126216
    assert seeding.sample_seed(42, 3, 12345) == 4729050362098357786
    assert seeding.sample_seed(2**64 + 5, 599, 1281166) == 7742946903985228454  # parts taken mod 2**64
    assert seeding.sample_seed(5, 599, 1281166) == 7742946903985228454


def test_a_file_that_is_no_checkpoint_is_named_with_its_first_eight_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({f"k{i:02d}": i for i in range(10)}, path)
    with pytest.raises(ValueError) as err:
        checkpoint.load(path)
    assert str(err.value) == (f"{path}: neither a state dict nor a project checkpoint (keys: "
                              "['k00', 'k01', 'k02', 'k03', 'k04', 'k05', 'k06', 'k07'])")


def test_a_full_disk_is_found_anywhere_in_an_exception_chain_even_a_cyclic_one():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = RuntimeError("torch.save failed")
    wrapped.__cause__ = full
    assert checkpoint._no_space(wrapped) and checkpoint._no_space(full)
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__context__ = b, a  # a cycle: the walk must end
    assert checkpoint._no_space(a) is False


def test_a_legacy_checkpoint_that_cannot_be_mapped_is_read_whole_and_a_failed_plain_read_is_not_retried(
        tmp_path, monkeypatch):
    """mmap=True on a file in torch's legacy (non-zip) format: torch refuses to map it (RuntimeError), so it
    is read whole, weights_only as every load, with the same values. Without mmap a RuntimeError (a
    truncated zip) is the one "not a readable checkpoint" error after a single read."""
    import datetime

    legacy = tmp_path / "legacy.pt"
    obj = checkpoint.new({"w": torch.arange(6.0).reshape(2, 3)}, epoch=4)
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap"):  # the premise: torch cannot map it
        torch.load(legacy, weights_only=True, mmap=True)
    for mmap in (True, False):
        loaded = checkpoint.load(legacy, mmap=mmap)
        assert loaded["epoch"] == 4 and loaded["version"] == checkpoint.FORMAT_VERSION, mmap
        assert torch.equal(loaded["model"]["w"], torch.arange(6.0).reshape(2, 3)), mmap
    # the fallback read is weights_only too: a pickled object outside the allowed types is refused, not run
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(1), "when": datetime.date(2020, 1, 1)}, unsafe,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError) as err:
        checkpoint.load(unsafe, mmap=True)
    assert str(err.value).startswith(f"{unsafe}: not a readable checkpoint (UnpicklingError: ")

    truncated = tmp_path / "truncated.pt"
    checkpoint.save(obj, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    real_load, calls = torch.load, []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    with pytest.raises(ValueError) as err:
        checkpoint.load(truncated, mmap=False)
    assert str(err.value).startswith(f"{truncated}: not a readable checkpoint (RuntimeError: ")
    assert calls == [False]  # no second read without mmap: it would fail the same way


_UNPICKLED = []


def _record_unpickling(value):
    _UNPICKLED.append(value)
    return value


class _RunsCodeWhenUnpickled:
    """What a hostile file holds: unpickling it calls a function of the pickle's choosing."""

    def __reduce__(self):
        return _record_unpickling, ("ran",)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_checkpoint_holding_objects_beyond_weights_is_refused_without_running_them(tmp_path, mmap):
    """Loading is torch.load(weights_only=True) on every path: a normal (zip) checkpoint that holds a
    pickled object outside tensors and plain containers (a datetime.date, or an object whose unpickling
    runs code) is the one "not a readable checkpoint" error, and the object's code never runs."""
    import datetime

    for name, extra in (("date.pt", datetime.date(2020, 1, 1)), ("code.pt", _RunsCodeWhenUnpickled())):
        path = tmp_path / name
        torch.save(checkpoint.new({"w": torch.ones(2)}, epoch=1, extra=extra), path)
        with pytest.raises(ValueError) as err:
            checkpoint.load(path, mmap=mmap)
        assert str(err.value).startswith(f"{path}: not a readable checkpoint (UnpicklingError: Weights only load "
                                         "failed"), err.value
    assert _UNPICKLED == []


def test_a_save_creates_missing_directories_and_syncs_every_byte_before_the_rename(tmp_path, monkeypatch):
    """The checkpoint directory is made on the first save (parents too); the file's bytes all reach the OS
    before fsync (the writer flushed), and fsync comes before the rename that makes the file visible."""
    target, text = tmp_path / "run" / "checkpoints" / "epoch_000.pt", tmp_path / "run" / "notes" / "a.txt"
    real_fsync, synced = os.fsync, []

    def fsync(fd):  # the size the OS has for the file, and whether the files are visible yet
        synced.append((os.fstat(fd).st_size, target.exists(), text.exists()))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    checkpoint.save(checkpoint.new({"w": torch.arange(3000.0)}, epoch=0), target)
    checkpoint.atomic_write_text(text, "a short note\n")  # held in the writer's buffer until flushed
    assert synced == [(target.stat().st_size, False, False), (13, True, False)]
    assert torch.equal(checkpoint.load(target)["model"]["w"], torch.arange(3000.0))
    assert sorted(p.name for p in target.parent.iterdir()) == ["epoch_000.pt"]


def test_a_checkpoint_in_the_documented_layout_loads_and_other_versions_are_named(tmp_path):
    """The module docstring's layout, written here by hand: {"format": "mbv3-recipes", "version": 1, "model":
    ..., "epoch": ...}; a version this code does not read is refused naming both versions."""
    sd = {"fc.weight": torch.ones(2, 2)}
    assert checkpoint.new(sd, epoch=3) == {"format": "mbv3-recipes", "version": 1, "model": sd, "epoch": 3}
    path = tmp_path / "v1.pt"
    torch.save({"format": "mbv3-recipes", "version": 1, "model": sd, "epoch": 3, "config": {"a": 1}}, path)
    loaded = checkpoint.load(path)
    assert (loaded["epoch"], loaded["config"]) == (3, {"a": 1})
    assert torch.equal(loaded["model"]["fc.weight"], sd["fc.weight"])
    torch.save({"format": "mbv3-recipes", "version": 2, "model": sd}, tmp_path / "v2.pt")
    with pytest.raises(ValueError) as err:
        checkpoint.load(tmp_path / "v2.pt")
    assert str(err.value) == (f"{tmp_path / 'v2.pt'}: checkpoint format version 2 is not supported "
                              "(this code reads version 1)")
    for missing in (tmp_path / "nope.pt", tmp_path):  # nothing there, or a directory
        with pytest.raises(FileNotFoundError) as err:
            checkpoint.load(missing)
        assert str(err.value) == f"{missing}: checkpoint not found"
    torch.save([sd], tmp_path / "list.pt")
    with pytest.raises(ValueError) as err:
        checkpoint.load(tmp_path / "list.pt")
    assert str(err.value) == f"{tmp_path / 'list.pt'}: expected a dict (state dict or project checkpoint), got list"


def test_prune_keeps_everything_when_keep_is_at_least_the_count_and_tolerates_a_file_already_gone(
        tmp_path, monkeypatch):
    names = ["epoch_000.pt", "epoch_001.pt"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    for keep in (2, 3):
        checkpoint.prune(tmp_path, keep)
        assert sorted(p.name for p in tmp_path.iterdir()) == names, keep
    # another process removed the oldest file between the listing and the unlink: not an error
    real_glob = type(tmp_path).glob

    def listed_then_removed(self, pattern):
        files = sorted(real_glob(self, pattern))
        files[0].unlink()
        return files

    monkeypatch.setattr(type(tmp_path), "glob", listed_then_removed)
    checkpoint.prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001.pt"]


def test_a_full_quota_is_a_full_disk_and_other_os_errors_are_not():
    import errno

    assert checkpoint._no_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not checkpoint._no_space(OSError(errno.EACCES, "Permission denied"))
    assert not checkpoint._no_space(RuntimeError("x")) and not checkpoint._no_space(None)
    during = RuntimeError("while handling")  # raised while handling the full disk: found through __context__
    during.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert checkpoint._no_space(during)


def test_file_digest_is_hashlibs_sha256_of_the_whole_file(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB chunk
    (tmp_path / "f.bin").write_bytes(data)
    assert checkpoint.file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert checkpoint.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_seed_everything_seeds_python_numpy_and_torch_numpy_with_the_seed_mod_2_32():
    """numpy takes seeds below 2**32: a larger seed (torch and Python take it whole) reaches it mod 2**32."""
    seed = 2**32 + 100
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # whatever state the process was in
    seeding.seed_everything(seed)
    got = (random.random(), np.random.rand(2), torch.rand(2))
    random.seed(seed)
    np.random.seed(100)
    torch.manual_seed(seed)
    assert got[0] == random.random() and np.array_equal(got[1], np.random.rand(2)) and torch.equal(got[2], torch.rand(2))


def test_the_cached_normal_draws_of_python_and_numpy_survive_the_round_trip(tmp_path):
    """Python's random.gauss and numpy's legacy normal draw two values and cache the second: the state
    carries the cached value, so the next normal draw after a resume is the one the run would have made."""
    seeding.seed_everything(5)
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    checkpoint.save(checkpoint.new({}, rng=seeding.rng_state()), tmp_path / "r.pt")
    expected = (random.gauss(0.0, 1.0), np.random.standard_normal())
    seeding.seed_everything(6)
    seeding.set_rng_state(checkpoint.load(tmp_path / "r.pt")["rng"])
    assert (random.gauss(0.0, 1.0), np.random.standard_normal()) == expected


def test_a_process_that_never_used_cuda_saves_no_cuda_state_and_does_not_start_cuda():
    if torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised in this process")
    state = seeding.rng_state()
    assert sorted(state) == ["numpy", "python", "torch"] and not torch.cuda.is_initialized()


def test_cuda_rng_state_is_saved_where_cuda_is_in_use_and_restored_only_where_cuda_is_available(monkeypatch):
    """With CUDA faked: a process that initialised CUDA saves its generators' states; a state that holds
    them restores them where CUDA is available, and is left alone on a CPU machine (a GPU run's checkpoint
    evaluated on a CPU); a state without them (a CPU run resumed on a GPU machine) leaves CUDA's alone."""
    restored = []
    cuda = {"available": True, "initialized": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda["available"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda["initialized"])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.full((4,), 7, dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    assert "cuda" not in seeding.rng_state()  # available but never used: CUDA is not started to save it
    cuda["initialized"] = True
    with_cuda = seeding.rng_state()
    assert torch.equal(with_cuda["cuda"][0], torch.full((4,), 7, dtype=torch.uint8))
    without_cuda = {k: v for k, v in with_cuda.items() if k != "cuda"}
    seeding.set_rng_state(without_cuda)
    assert restored == []
    seeding.set_rng_state(with_cuda)
    assert len(restored) == 1 and restored[0] is with_cuda["cuda"]
    cuda["available"] = False
    seeding.set_rng_state(with_cuda)
    assert len(restored) == 1


def test_load_reads_the_file_whole_unless_asked_to_map_it(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save(checkpoint.new({"w": torch.ones(2)}), path)
    real_load, calls = torch.load, []

    def counted(*args, **kwargs):
        calls.append((kwargs.get("mmap"), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    checkpoint.load(path)
    checkpoint.load(path, mmap=True)
    assert calls == [(False, True), (True, True)]
