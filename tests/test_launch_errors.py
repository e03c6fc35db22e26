"""engine.loop.launch: an error raised in a DataLoader worker reaches the user whole (every line of the
worker's own message, the file it names included), without a traceback."""

import os
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

import train_classification as tc
from engine.errors import DataError
from engine.loop import launch
from tests.conftest import ROOT

# A name that is not UTF-8 (Python keeps the byte as a surrogate escape) and a message of several lines,
# some indented, as the multi-problem DataErrors are.
PATH = os.fsdecode(b"/data/val/circ\xffle.jpg")
MESSAGE = f"{PATH}: first line\n  an indented second line\nthird line: with a colon"


class Failing(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        try:
            raise OSError("the cause")
        except OSError:  # an exception chained to another: the worker's text holds two tracebacks
            raise DataError(MESSAGE)


def test_a_loader_workers_error_is_printed_whole(tmp_path, capsys):
    def main(cfg):
        next(iter(DataLoader(Failing(), num_workers=1)))

    with pytest.raises(SystemExit) as exc:
        launch(tc.Config, main, argv=["--recipe", str(ROOT / "recipes/toy/classification.yaml"),
                                      f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    shown = MESSAGE.replace("\udcff", "\\udcff")  # the undecodable byte, as Python escapes it
    assert err == f"{Path(sys.argv[0]).name}: error: {shown}\n"
