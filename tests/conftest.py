import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """The built-in toy datasets, generated once per test session."""
    from tools.make_toy_data import main

    out = tmp_path_factory.mktemp("toy")
    main(["--out", str(out), "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """24 natural photographs at ImageNet's size distribution (tools/make_photos.py), made once per
    session: the ImageFolder split (one class folder per tenth of the files)."""
    from tools.make_photos import write

    return write(tmp_path_factory.mktemp("photos"), n=24, seed=0)


@pytest.fixture(scope="session")
def toy_backbone(toy_data, tmp_path_factory) -> Path:
    """A classification checkpoint of MobileNetV3-Large (width 1.0, 10 classes) trained 2 epochs on
    the toy ImageNet at 64 px: the `model.backbone_weights` of the toy detection/segmentation runs."""
    out = tmp_path_factory.mktemp("toy_backbone")
    proc = subprocess.run([sys.executable, str(ROOT / "train_classification.py"), "--recipe",
                           str(ROOT / "recipes/toy/classification.yaml"), f"data.root={toy_data / 'imagenet'}",
                           f"run.output_dir={out}", "schedule.epochs=2", "data.workers=0", "run.print_freq=1000"],
                          capture_output=True, text=True, cwd=out, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints" / "last.pt"


def run_in_process(script: str | Path, args: list, cwd: Path) -> subprocess.CompletedProcess:
    """`python script args` in this process, for runs that end before training (a refusal, --print-config,
    --check-data): the same exit status, stdout and stderr as a subprocess, without its 3-5 s of imports.
    Everything a script may change in the process is put back: cwd, argv, environment, signal handlers,
    torch's thread count."""
    import contextlib
    import io
    import runpy
    import signal

    import torch

    out, err = io.StringIO(), io.StringIO()
    code = 0
    saved = (os.getcwd(), list(sys.argv), dict(os.environ), torch.get_num_threads(),
             {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT,
                                                signal.SIGCHLD)})
    try:
        os.chdir(cwd)
        sys.argv = [str(script), *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
        for s, handler in saved[4].items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def small_disk(parent: Path, size: str):
    """A real tmpfs of `size` (e.g. "8m") mounted at parent/disk for a full-disk test, unmounted after;
    the test is skipped where mounting is not allowed (it needs root)."""
    disk = parent / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)
