"""tools/restart_markers.py on real files: every JPEG rewritten decodes to the same pixels (torchvision's
decoder), other files are copied byte for byte, a killed run continues, a complete one is left alone, and
a wrong folder is one message."""

import io
import subprocess
import sys

import pytest
import torch
from PIL import Image

from data.classification import decode_bytes
from tests.conftest import ROOT
from tools import restart_markers

pytest.importorskip("data._jpeg", reason="data/_jpeg.c is not built (libjpeg's headers are missing)")


def _split(photos, tmp_path):
    """Five photographs and, beside them, a PNG and a CMYK JPEG, in two class folders."""
    src = tmp_path / "train"
    files = sorted(photos.rglob("*.jpg"))[:5]
    for i, f in enumerate(files):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"c{i % 2}" / f.name).write_bytes(f.read_bytes())
    rgb = Image.open(files[0]).convert("RGB")
    rgb.save(src / "c0" / "a.png")
    rgb.convert("CMYK").save(src / "c1" / "b.jpg", format="JPEG")
    return src


def test_rewritten_files_decode_to_the_same_pixels_and_a_killed_run_continues(photos, tmp_path):
    src, dst = _split(photos, tmp_path), tmp_path / "rst"
    counts = restart_markers.rewrite(src, dst, log=lambda _: None)
    assert (counts["rewritten"], counts["copied"], counts["kept"]) == (5, 2, 0)
    sources = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file() and p.name != restart_markers.DONE) \
        == sources
    for rel in sources:
        a, b = (src / rel).read_bytes(), (dst / rel).read_bytes()
        if rel.name in ("a.png", "b.jpg"):
            assert a == b, rel
        else:
            assert a != b and b"\xff\xdd\x00\x04\x00\x01" in b, rel  # DRI: a restart every MCU
            assert torch.equal(decode_bytes(a, str(rel)), decode_bytes(b, str(rel))), rel
            im = Image.open(io.BytesIO(b))
            assert im.size == Image.open(io.BytesIO(a)).size
    # killed half-way: one file not written yet, one left half-written under its temporary name
    (dst / restart_markers.DONE).unlink()
    victim = dst / sources[0]
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp").write_bytes(b"half")
    again = restart_markers.rewrite(src, dst, log=lambda _: None)
    assert (again["rewritten"] + again["copied"], again["kept"]) == (1, 6)
    assert not list(dst.rglob(".*.tmp")) and victim.exists()
    assert torch.equal(decode_bytes(victim.read_bytes(), "v"), decode_bytes((src / sources[0]).read_bytes(), "s"))
    lines = []
    restart_markers.rewrite(src, dst, log=lines.append)  # complete: left alone
    assert lines == [f"{dst}: complete ({restart_markers.DONE} present), nothing to do"]


def test_a_wrong_folder_is_one_message(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools/restart_markers.py"), *map(str, args)],
                              capture_output=True, text=True)

    missing = run(tmp_path / "nowhere" / "train", tmp_path / "out")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"data.root: {tmp_path / 'nowhere'} does not exist" in missing.stderr
    (tmp_path / "train" / "c0").mkdir(parents=True)
    (tmp_path / "train" / "c0" / "x.jpg").write_bytes(b"not a jpeg")
    same = run(tmp_path / "train", tmp_path / "train")
    assert same.returncode == 1 and same.stderr.strip() == \
        f"restart_markers.py: error: {tmp_path / 'train'}: the same folder as the source; give another one"
