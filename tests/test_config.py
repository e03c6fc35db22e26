import dataclasses
import subprocess
import sys
from typing import Literal, Optional

import pytest

from engine.config import ConfigError, RunConfig, dump_config, load_config, save_config
from tests.conftest import ROOT, run_in_process


@dataclasses.dataclass(frozen=True)
class Opt:
    name: Literal["sgd", "rmsprop"]
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    milestones: list[int] = dataclasses.field(default_factory=list)
    nesterov: bool = False
    eps: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Cfg:
    optimizer: Opt
    run: RunConfig


RECIPE = """
optimizer: {name: sgd, lr: 0.1, weight_decay: 1.0e-4, milestones: [16, 22]}
run: {output_dir: out, seed: 0}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return p


def test_loads_typed_frozen(recipe):
    cfg = load_config(Cfg, recipe)
    assert cfg.optimizer.lr == 0.1 and cfg.optimizer.milestones == [16, 22]
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.run.resume is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimizer.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):  # the shared run section too
        cfg.run.seed = 1


def test_overrides_parse_with_field_type(recipe):
    cfg = load_config(Cfg, recipe, [
        "optimizer.lr=1e-3",            # YAML would read this as a string; the float field decides
        "optimizer.nesterov=true",
        "optimizer.eps=None",
        "optimizer.milestones=[1, 2, 3]",
        "optimizer.betas=[0.5, 0.6]",
        "run.resume=auto",
        "run.keep_checkpoints=null",
        "run.output_dir=123",           # a str field keeps the text as typed
    ])
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.nesterov is True and cfg.optimizer.eps is None
    assert cfg.optimizer.milestones == [1, 2, 3] and cfg.optimizer.betas == (0.5, 0.6)
    assert cfg.run.resume == "auto" and cfg.run.output_dir == "123"
    assert load_config(Cfg, recipe, ["optimizer.eps=0.5"]).optimizer.eps == 0.5


def test_all_errors_reported_at_once(recipe):
    recipe.write_text(RECIPE + "extra_section: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["optimizer.weight_decy=1e-4", "optimizer.name=adamx",
                                  "optimizer.lr=fast", "run.seed=1.5", "optimizer.betas=[1]"])
    problems = err.value.problems
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "command line: optimizer.weight_decy: unknown key (did you mean 'optimizer.weight_decay'?)" in text
    assert "invalid choice 'adamx'" in text and "'sgd', 'rmsprop'" in text
    assert "command line: optimizer.lr: expected float, got 'fast'" in text
    assert "command line: run.seed: expected int, got 1.5" in text
    assert "optimizer.betas: expected a list of 2" in text
    assert f"{recipe}: extra_section: unknown key" in text


def test_bad_value_of_a_defaulted_field_is_reported_not_raised(recipe):
    with pytest.raises(ConfigError, match="command line: run.print_freq: expected int, got 'often'"):
        load_config(Cfg, recipe, ["run.print_freq=often"])
    with pytest.raises(ConfigError, match="run.print_freq: expected a positive number of steps"):
        load_config(Cfg, recipe, ["run.print_freq=0"])


def test_misspelt_key_in_file_names_file(recipe):
    recipe.write_text(RECIPE.replace("weight_decay", "weight_decy"))
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe)
    text = str(err.value)
    assert f"{recipe}: optimizer.weight_decy: unknown key (did you mean 'optimizer.weight_decay'?)" in text
    assert f"{recipe}: optimizer.weight_decay: missing" in text


def test_round_trip(recipe, tmp_path):
    cfg = load_config(Cfg, recipe, ["optimizer.betas=[0.1, 0.2]", "optimizer.eps=0.0316"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Cfg, tmp_path / "config.yaml") == cfg
    assert "betas: [0.1, 0.2]" in dump_config(cfg)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)


def test_script_cli_exit_2_without_traceback(tmp_path):
    """The acceptance scenario: a misspelt key on a real script's command line."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_classification.py"), "--recipe", str(ROOT / "recipes/large.yaml"),
         "optimizer.weight_decy=1e-4"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "command line: optimizer.weight_decy: unknown key (did you mean 'optimizer.weight_decay'?)" in proc.stderr


def test_print_config_shows_derived_values(tmp_path):
    proc = run_in_process("train_classification.py", ["--recipe", ROOT / "recipes/large.yaml", "--print-config"],
                          tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.064" in proc.stdout
    assert "global_batch: 1024" in proc.stdout  # 128 per process x 8 processes
    assert "steps_per_epoch" not in proc.stdout  # /data/imagenet is not on this machine


def test_print_config_counts_steps_when_data_is_present(toy_data, tmp_path):
    proc = run_in_process("train_classification.py", ["--recipe", ROOT / "recipes/toy/classification.yaml",
                                                      f"data.root={toy_data / 'imagenet'}", "--print-config"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train_images: 400" in proc.stdout and "steps_per_epoch: 13" in proc.stdout


def test_numbers_in_a_recipe_parse_as_on_the_command_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer: {name: sgd, lr: 2e-3, weight_decay: 4E-5, betas: [1e-1, .5], eps: -1e+2}\n"
                 "run: {output_dir: 1e-3, seed: 0}\n")
    from_file = load_config(Cfg, p)
    assert (from_file.optimizer.lr, from_file.optimizer.weight_decay) == (0.002, 4e-05)
    assert from_file.optimizer.betas == (0.1, 0.5) and from_file.optimizer.eps == -100.0
    assert from_file.run.output_dir == "1e-3"  # a str field keeps the text
    p.write_text("optimizer: {name: sgd, lr: 0.1, weight_decay: 0.0}\nrun: {output_dir: x, seed: 0}\n")
    typed = load_config(Cfg, p, ["optimizer.lr=2e-3", "optimizer.weight_decay=4E-5", "optimizer.betas=[1e-1, .5]",
                                 "optimizer.eps=-1e+2", "run.output_dir=1e-3"])
    assert typed == from_file
    p.write_text("optimizer: {name: sgd, lr: 2e-3x, weight_decay: 0.0}\nrun: {output_dir: x, seed: 0}\n")
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float, got '2e-3x'"):
        load_config(Cfg, p)


def test_a_key_given_twice_is_refused_naming_file_key_and_lines(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer:\n  name: sgd\n  lr: 0.1\n  weight_decay: 0.0\n  lr: 0.2\nrun: {output_dir: x, seed: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, p)
    assert err.value.problems == [f"{p}: line 5: key 'lr' is given twice (first on line 3); "
                                  "a recipe names each key once"]
    p.write_text("run: {output_dir: x, seed: 0}\noptimizer: {name: sgd, lr: 0.1, weight_decay: 0.0}\nrun: {}\n")
    with pytest.raises(ConfigError, match="line 3: key 'run' is given twice"):
        load_config(Cfg, p)


def test_yaml_merge_keys_share_a_section_and_a_key_after_the_merge_overrides_it(tmp_path):
    """`<<: *name` (YAML's merge key) is how one recipe file shares a block between sections: the merged keys
    are not 'given twice' when the section sets one of them again, and the section's own value wins."""
    p = tmp_path / "r.yaml"
    p.write_text("optimizer:\n  <<: &sgd {name: sgd, lr: 0.1, weight_decay: 0.5}\n  lr: 0.2\n"
                 "run: {output_dir: x, seed: 0}\n")
    cfg = load_config(Cfg, p)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("sgd", 0.2, 0.5)
    p.write_text("optimizer:\n  <<: {name: sgd, lr: 0.1, weight_decay: 0.5}\n  lr: 0.2\n  lr: 0.3\n"
                 "run: {output_dir: x, seed: 0}\n")
    with pytest.raises(ConfigError, match="line 4: key 'lr' is given twice"):
        load_config(Cfg, p)


@pytest.mark.parametrize("what", ["directory", "binary"])
def test_a_recipe_that_is_a_directory_or_binary_is_one_message(tmp_path, what):
    path = tmp_path / "recipe"
    if what == "directory":
        path.mkdir()
        message = f"{path}: is a directory; expected a recipe file (YAML)"
    else:
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
        message = f"{path}: not a text file (byte 136 is not UTF-8); expected a recipe file (YAML)"
    proc = run_in_process("train_classification.py", ["--recipe", path], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_print_config_with_a_global_batch_that_cannot_be_met_is_the_run_s_message(tmp_path):
    args = ["--recipe", ROOT / "recipes/large.yaml", "data.batch_size=5"]
    printed = run_in_process("train_classification.py", [*args, "--print-config"], tmp_path)
    assert printed.returncode == 2 and printed.stdout == "" and "Traceback" not in printed.stderr
    assert ("train.accumulate=auto: the recipe's global batch (run.global_batch=1024) is not a multiple of "
            "1 processes x data.batch_size 5 = 5") in printed.stderr, printed.stderr
    from engine.loop import plan_batch
    from train_classification import Config

    cfg = load_config(Config, ROOT / "recipes/large.yaml", ["data.batch_size=5"])
    with pytest.raises(ConfigError) as err:  # what main() raises, and launch() prints with exit 2
        plan_batch(cfg.run, 5, "auto", "none", 1)
    assert printed.stderr.splitlines()[1] == f"  {err.value.problems[0]}"


@dataclasses.dataclass(frozen=True)
class Sized:
    size: int | tuple[int, int]     # a union without None: null is not a value it takes
    eps: Optional[float] = 1.0      # an optional one: null is


@dataclasses.dataclass(frozen=True)
class SizedCfg:
    sized: Sized
    run: RunConfig


def test_null_for_a_key_that_is_not_optional_is_refused_with_the_other_problems(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("sized: {size: null, eps: null}\nrun: {output_dir: out, seed: null, print_freq: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(SizedCfg, p, ["run.unknown=1"])
    assert sorted(err.value.problems) == sorted([
        f"{p}: sized.size: expected int or a list of 2 (int, int), got null",
        f"{p}: run.seed: expected int, got None",
        "command line: run.unknown: unknown key; valid keys here: " + ", ".join(
            f.name for f in dataclasses.fields(RunConfig)),
    ])
    p.write_text("sized: {size: [3, 4], eps: null}\nrun: {output_dir: out, seed: 1}\n")
    cfg = load_config(SizedCfg, p, ["sized.size=null", "sized.size=5"])  # the last override wins
    assert cfg.sized == Sized(size=5, eps=None)
    with pytest.raises(ConfigError) as err:
        load_config(SizedCfg, p, ["sized.size=None"])
    assert err.value.problems == ["command line: sized.size: expected int or a list of 2 (int, int), got null"]


@pytest.mark.parametrize("text,kind", [("- optimizer\n- run\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_a_recipe_whose_top_level_is_not_a_mapping_names_the_file(tmp_path, text, kind):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, p)
    assert err.value.problems == [f"{p}: expected a mapping of sections at the top, got {kind}"]


def test_an_empty_recipe_reports_every_missing_section_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, p)
    assert sorted(err.value.problems) == sorted(
        [f"{p}: optimizer.{k}: missing: expected {t} (this field has no default)"
         for k, t in [("name", "one of 'sgd', 'rmsprop'"), ("lr", "float"), ("weight_decay", "float")]]
        + [f"{p}: run.{k}: missing: expected {t} (this field has no default)"
           for k, t in [("output_dir", "str"), ("seed", "int")]])


@pytest.mark.parametrize("key,good,bad", [
    ("global_batch", [1, 2, None], [0, -8]),
    ("world_size", [1, 64, None], [0, -1]),
    ("keep_checkpoints", [0, 1, None], [-1]),
    ("divergence_factor", [1.001, 10.0, None], [1.0, 0.5, 0.0]),
    ("print_freq", [1, 50], [0, -5]),
])
def test_run_section_bounds(key, good, bad):
    for value in good:
        assert list(RunConfig(output_dir="o", seed=0, **{key: value}).validate()) == [], (key, value)
    for value in bad:
        problems = list(RunConfig(output_dir="o", seed=0, **{key: value}).validate())
        assert [k for k, _ in problems] == [key] and str(value) in problems[0][1], (key, value)


def test_a_list_field_given_a_scalar_and_conflicting_overrides_are_refused(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["optimizer.milestones=5", "optimizer.betas=0.5"])
    assert err.value.problems == ["command line: optimizer.milestones: expected a list of int, got 5",
                                  "command line: optimizer.betas: expected a list of 2 (float, float), got 0.5"]
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["optimizer.lr=0.2", "optimizer.lr.x.y=1", "run.seed=3"])
    assert err.value.problems == ["command line: optimizer.lr.x.y: conflicts with an earlier override"]


@pytest.mark.parametrize("script", ["train_classification", "train_detection", "train_segmentation", "train_qat"])
def test_every_section_of_every_script_config_is_frozen(script):
    """Nothing writes back into the config (DESIGN rule 1): each section is a frozen dataclass."""
    import importlib
    import typing

    def sections(cls):
        yield cls
        for tp in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(tp):
                yield from sections(tp)

    found = list(sections(importlib.import_module(script).Config))
    assert len(found) >= 5 and RunConfig in found
    assert [c.__name__ for c in found if not c.__dataclass_params__.frozen] == []


def test_the_cli_counts_problems_in_words(recipe, capsys):
    from engine.config import cli

    for overrides, head in [(["run.seed=x"], "t: 1 problem with the configuration:"),
                            (["run.seed=x", "optimizer.lr=y"], "t: 2 problems with the configuration:")]:
        with pytest.raises(SystemExit) as exit_:
            cli(Cfg, ["--recipe", str(recipe), *overrides], prog="t")
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and err[0] == head and len(err) == len(overrides) + 2
        assert err[-1] == "usage: t --recipe PATH [--print-config] [--check-data] [section.key=value ...]"


def test_config_yaml_has_sections_as_blocks_and_lists_inline(recipe):
    cfg = load_config(Cfg, recipe, ["optimizer.eps=0.5"])
    assert dump_config(cfg) == (
        "optimizer:\n  name: sgd\n  lr: 0.1\n  weight_decay: 0.0001\n  betas: [0.9, 0.999]\n  milestones: [16, 22]\n"
        "  nesterov: false\n  eps: 0.5\nrun:\n  output_dir: out\n  seed: 0\n  device: auto\n  resume: null\n"
        "  eval_only: false\n  keep_checkpoints: null\n  print_freq: 50\n  world_size: null\n  global_batch: null\n"
        "  allow_changes: false\n  check_data: false\n  divergence_factor: 10.0\n")


def test_check_data_flag_and_overrides_on_the_cli(recipe):
    from engine.config import cli

    cfg = cli(Cfg, ["--recipe", str(recipe), "--check-data", "run.seed=5"], prog="t")
    assert cfg.run.check_data is True and cfg.run.seed == 5
    assert cli(Cfg, [f"--recipe={recipe}"], prog="t").run.check_data is False


def test_a_configuration_error_raised_by_main_is_counted_in_words(recipe, capsys, monkeypatch):
    """launch(): a ConfigError from main (e.g. no optimizer step per epoch) is exit 2 with its problems
    counted in words, as the CLI counts its own."""
    from engine.loop import launch

    monkeypatch.setattr(sys, "argv", ["t.py"])
    for problems, head in [(["a: bad"], "t.py: 1 problem with the configuration:"),
                           (["a: bad", "b: worse"], "t.py: 2 problems with the configuration:")]:
        def main(cfg, problems=problems):
            raise ConfigError(problems)

        with pytest.raises(SystemExit) as exit_:
            launch(Cfg, main, argv=["--recipe", str(recipe)])
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and err == [head] + [f"  {p}" for p in problems]


def test_field_help_lists_every_key_with_its_section_prefix():
    from engine.config import _field_help

    lines = _field_help(Cfg).splitlines()
    assert "  optimizer.lr: float" in lines and "  run.seed: int" in lines


def test_help_prints_the_usage_and_every_key_and_exits_0(capsys):
    from engine.config import cli

    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_:
            cli(Cfg, [flag], prog="t.py")
        out = capsys.readouterr().out.splitlines()
        assert exit_.value.code == 0
        assert out[0] == "usage: t.py --recipe PATH [--print-config] [--check-data] [section.key=value ...]"
        assert "  optimizer.lr: float" in out


def test_launch_destroys_the_process_group_main_leaves_whatever_way_it_ends(recipe, tmp_path, monkeypatch):
    """A process group left behind keeps its store's sockets and, with NCCL, the communicators: launch()
    destroys it after main returns, after a user error (exit 1), and after a configuration error (exit 2)."""
    import torch.distributed as dist

    from engine.errors import UserError
    from engine.loop import launch

    monkeypatch.setattr(sys, "argv", ["t.py"])
    store = tmp_path / "store"

    def main(cfg, end=None):
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        assert dist.is_initialized()
        if end is not None:
            raise end

    for i, (end, code) in enumerate([(None, None), (UserError("bad input"), 1), (ConfigError(["a: bad"]), 2)]):
        store = tmp_path / f"store{i}"
        if code is None:
            launch(Cfg, main, argv=["--recipe", str(recipe)])
        else:
            with pytest.raises(SystemExit) as exit_:
                launch(Cfg, lambda cfg, end=end: main(cfg, end), argv=["--recipe", str(recipe)])
            assert exit_.value.code == code
        assert not dist.is_initialized(), end


def test_overrides_nest_by_every_dot_of_the_key():
    from engine.config import parse_overrides

    nested, keys, bad = parse_overrides(["a.b.c=1", "a.b.d=x", "run.seed=3"])
    assert nested == {"a": {"b": {"c": "1", "d": "x"}}, "run": {"seed": "3"}} and bad == []
    assert keys == {"a.b.c", "a.b.d", "run.seed"}
    _, _, bad = parse_overrides(["a.b=1", "a.b.c=2"])
    assert bad == ["command line: a.b.c: conflicts with an earlier override"]


def test_a_value_no_member_of_a_union_takes_is_named_with_the_key_and_the_union(tmp_path):
    """`size: int | tuple[int, int]`: a value neither member takes is one problem naming both members and the
    value as given (a string, a list of the wrong length), from the recipe or the command line."""
    p = tmp_path / "r.yaml"
    p.write_text("sized: {size: big}\nrun: {output_dir: out, seed: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(SizedCfg, p)
    assert err.value.problems == [f"{p}: sized.size: expected int or a list of 2 (int, int), got 'big'"]
    with pytest.raises(ConfigError) as err:
        load_config(SizedCfg, p, ["sized.size=[1, 2, 3]"])
    assert err.value.problems == [
        "command line: sized.size: expected int or a list of 2 (int, int), got [1, 2, 3]"]
    assert load_config(SizedCfg, p, ["sized.size=[1, 2]"]).sized.size == (1, 2)  # the second member takes it


def test_a_section_given_a_value_that_is_no_mapping_names_the_section_and_its_type(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer: 3\nrun: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, p)
    assert err.value.problems == [f"{p}: optimizer: expected a mapping (Opt), got 3",
                                  f"{p}: run: expected a mapping (RunConfig), got [1, 2]"]
    p.write_text(RECIPE)
    with pytest.raises(ConfigError) as err:  # a whole section replaced on the command line
        load_config(Cfg, p, ["optimizer=3"])
    assert err.value.problems == ["command line: optimizer: expected a mapping (Opt), got 3"]


def test_malformed_overrides_are_each_named_and_reported_together(recipe):
    from engine.config import parse_overrides

    malformed = ["foo", "=3", "run.=3", ".x=1", "run..x=1"]
    expected = [f"command line: {item!r}: expected section.key=value" for item in malformed]
    nested, keys, bad = parse_overrides(malformed[:2] + ["run.seed=3"] + malformed[2:])
    assert bad == expected
    assert nested == {"run": {"seed": "3"}} and keys == {"run.seed"}  # the well-formed one among them is kept
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, malformed)
    assert err.value.problems == expected


@pytest.mark.parametrize("argv,problem", [
    (["run.seed=1", "--recipe"], "command line: --recipe needs a path"),
    (["--recipe", "r.yaml", "--foo"], "command line: unknown option '--foo'"),
    (["run.seed=1", "--print-config"], "command line: --recipe PATH is required"),
])
def test_a_cli_without_a_recipe_or_with_an_unknown_option_exits_2_saying_so(capsys, argv, problem):
    from engine.config import cli

    with pytest.raises(SystemExit) as exit_:
        cli(Cfg, argv, prog="t.py")
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        "t.py: 1 problem with the configuration:", f"  {problem}",
        "usage: t.py --recipe PATH [--print-config] [--check-data] [section.key=value ...]"]


def test_a_config_error_reads_as_its_problems_one_per_line(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["run.seed=x", "optimizer.lr=y"])
    assert str(err.value) == ("command line: optimizer.lr: expected float, got 'y'\n"
                              "command line: run.seed: expected int, got 'x'")


def test_the_documented_example_of_a_misspelt_key_and_an_invalid_choice(capsys):
    """docs/training.md's example, in-process: a choice close to a valid one gets a did-you-mean, a misspelt
    key its did-you-mean and the section's valid keys. (The documented usage line predates --check-data.)"""
    from engine.config import cli
    from engine.optim import OptimizerConfig
    from train_classification import Config

    with pytest.raises(SystemExit) as exit_:
        cli(Config, ["--recipe", str(ROOT / "recipes/large.yaml"), "optimizer.weight_decy=1e-4", "optimizer.name=adam"],
            prog="train_classification.py")
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2
    valid = ", ".join(f.name for f in dataclasses.fields(OptimizerConfig))
    assert valid.startswith("name, lr, ")
    assert err == [
        "train_classification.py: 2 problems with the configuration:",
        "  command line: optimizer.name: invalid choice 'adam': expected one of 'rmsprop', 'rmsprop_tf', 'sgd', "
        "'adamw' (did you mean 'adamw'?)",
        "  command line: optimizer.weight_decy: unknown key (did you mean 'optimizer.weight_decay'?); valid keys "
        f"here: {valid}",
        "usage: train_classification.py --recipe PATH [--print-config] [--check-data] [section.key=value ...]"]


@dataclasses.dataclass(frozen=True)
class Tuples:
    one: tuple[float] = (1.0,)                  # a fixed length of one
    sizes: tuple[int, ...] = (1, 2)             # any length


@dataclasses.dataclass(frozen=True)
class TuplesCfg:
    tuples: Tuples
    run: RunConfig


def test_tuple_fields_of_one_item_and_of_any_length(recipe):
    recipe.write_text("run: {output_dir: out, seed: 0}\n")
    cfg = load_config(TuplesCfg, recipe, ["tuples.one=[0.5]", "tuples.sizes=[3, 4, 5]"])
    assert cfg.tuples == Tuples(one=(0.5,), sizes=(3, 4, 5))
    assert load_config(TuplesCfg, recipe, ["tuples.sizes=[]"]).tuples.sizes == ()
    with pytest.raises(ConfigError) as err:
        load_config(TuplesCfg, recipe, ["tuples.one=[0.5, 0.6]", "tuples.sizes=5"])
    assert err.value.problems == ["command line: tuples.one: expected a list of 1 (float), got 2 items: [0.5, 0.6]",
                                  "command line: tuples.sizes: expected a list of int, got 5"]


def test_command_line_text_that_is_not_yaml_is_kept_as_text_by_a_str_or_null_field(recipe):
    """`run.resume=@scratch/last.pt`: YAML cannot parse the text (`@` is reserved), so a `str | None` field
    takes it as typed; only the null words make it null."""
    assert load_config(Cfg, recipe, ["run.resume=@scratch/last.pt"]).run.resume == "@scratch/last.pt"
    assert load_config(Cfg, recipe, ["run.resume=a: b: c"]).run.resume == "a: b: c"
    assert load_config(Cfg, recipe, ["run.resume=~"]).run.resume is None


def test_each_item_of_a_list_field_is_checked_and_named_by_its_index(recipe):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["optimizer.milestones=[1, x, 3.5]"])
    assert err.value.problems == ["command line: optimizer.milestones[1]: expected int, got 'x'",
                                  "command line: optimizer.milestones[2]: expected int, got 3.5"]
    recipe.write_text(RECIPE.replace("[16, 22]", "[16, 22.5]"))
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe)
    assert err.value.problems == [f"{recipe}: optimizer.milestones[1]: expected int, got 22.5"]


def test_print_config_prints_the_resolved_recipe_then_the_derived_values_in_their_order(recipe, capsys):
    """--print-config: the config as config.yaml holds it, then `# derived` and derived(cfg) as YAML in the
    order derived() gives (not sorted), and exit 0; without derived() only the config."""
    from engine.config import cli

    with pytest.raises(SystemExit) as exit_:
        cli(Cfg, ["--recipe", str(recipe), "--print-config", "run.seed=3"], prog="t",
            derived=lambda cfg: {"steps_per_epoch": 13, "accumulate": 8, "seed_used": cfg.run.seed})
    out = capsys.readouterr().out
    config = ("optimizer:\n  name: sgd\n  lr: 0.1\n  weight_decay: 0.0001\n  betas: [0.9, 0.999]\n"
              "  milestones: [16, 22]\n  nesterov: false\n  eps: null\nrun:\n  output_dir: out\n  seed: 3\n"
              "  device: auto\n  resume: null\n  eval_only: false\n  keep_checkpoints: null\n  print_freq: 50\n"
              "  world_size: null\n  global_batch: null\n  allow_changes: false\n  check_data: false\n"
              "  divergence_factor: 10.0\n")
    assert exit_.value.code == 0
    assert out == config + "# derived\nderived:\n  steps_per_epoch: 13\n  accumulate: 8\n  seed_used: 3\n"
    with pytest.raises(SystemExit) as exit_:
        cli(Cfg, [f"--recipe={recipe}", "--print-config", "run.seed=3"], prog="t")
    assert exit_.value.code == 0 and capsys.readouterr().out == config


def test_a_recipe_path_with_an_equals_sign_after_recipe_equals(tmp_path):
    """`--recipe=sweeps/lr=0.2.yaml`: only the first `=` separates the option from the path."""
    from engine.config import cli

    path = tmp_path / "lr=0.2.yaml"
    path.write_text(RECIPE)
    assert cli(Cfg, [f"--recipe={path}"], prog="t").optimizer.lr == 0.1


def test_problems_under_a_key_typed_on_the_command_line_are_the_command_line_s(recipe):
    """Where a problem comes from: a whole section given on the command line (a YAML mapping), or a key
    below one the recipe does not have, are the command line's, not the recipe file's."""
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["optimizer={name: sgd, lr: fast, weight_decay: 0.0}"])
    assert err.value.problems == ["command line: optimizer.lr: expected float, got 'fast'"]
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, recipe, ["optimizer.schedule.gamma=0.1"])
    assert err.value.problems == [
        "command line: optimizer.schedule: unknown key; valid keys here: "
        + ", ".join(f.name for f in dataclasses.fields(Opt))]
