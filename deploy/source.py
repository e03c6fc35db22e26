"""What is being exported: the task, its resolved recipe, the weights file and the model built from them.

`resolve(path, recipe)` reads a run directory (its `config.yaml` and the weights the run directory
contract names) or a bare weights file with `--recipe`, and refuses, as one UserError naming the file and
what was expected, a run directory without weights, a checkpoint trained with another recipe (its stored
config names another task or model), or weights that do not fit the recipe's model.

The recipes are the training scripts' own config classes (`train_*.Config`), loaded with the same
loader, so a run directory's `config.yaml` is read exactly as the run wrote it. Importing a script is
cheap: each keeps its work under `if __name__ == "__main__"`. (DESIGN: scripts never import each other;
this package sits one layer above them, as reproduce/ does.)
"""

from __future__ import annotations

import dataclasses
import importlib
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import checkpoint
from engine.config import ConfigError, load_config, load_config_dict
from engine.errors import UserError

# task -> the script whose Config reads its recipe
SCRIPTS = {"classification": "train_classification", "detection": "train_detection",
           "segmentation": "train_segmentation", "qat": "train_qat", "ptq": "train_qat"}
DETECTORS = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")
SEGMENTERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_mobilenet_v3_large")
CLASSIFIERS = ("mobilenet_v3_large", "mobilenet_v3_small")


@dataclasses.dataclass(frozen=True)
class Source:
    task: str            # classification | qat | ptq | detection | segmentation
    cfg: Any             # the script's frozen Config
    recipe: Path         # config.yaml of the run, or --recipe
    weights: Path        # the file the exported weights come from
    sha256: str
    run_dir: Path | None

    @property
    def model_name(self) -> str:
        return self.cfg.model.name


def task_of(raw: dict, where: str) -> str:
    """The task a resolved recipe (as a plain dict) trains, from its sections and model name."""
    model = raw.get("model") or {}
    name = model.get("name")
    if "qat" in raw:
        return "ptq" if (raw["qat"] or {}).get("mode") == "ptq" else "qat"
    if name in DETECTORS:
        return "detection"
    if name in SEGMENTERS:
        return "segmentation"
    if name in CLASSIFIERS:
        return "classification"
    raise UserError(f"{where}: model.name {name!r} is not a model this repository trains "
                    f"(expected one of {', '.join(CLASSIFIERS + DETECTORS + SEGMENTERS)})")


def script(task: str):
    return importlib.import_module(SCRIPTS[task])


def load_recipe(path: Path, data_root: str | None) -> tuple[str, Any]:
    """(task, Config) of a recipe file; data.root replaced by `data_root` when given."""
    try:
        raw = load_config_dict(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the recipe ({exc})") from None
    task = task_of(raw, str(path))
    overrides = [f"data.root={data_root}"] if data_root else []
    try:
        cfg = load_config(script(task).Config, path, overrides)
    except ConfigError as exc:
        raise UserError(f"{path}: not a valid {task} recipe:\n  " + "\n  ".join(exc.problems)) from None
    return task, cfg


def run_weights(run_dir: Path, task: str) -> Path:
    """The weights of a run directory: classification's averaged.pt (the released rule, written by
    average_checkpoints.py) if there is one, else checkpoints/last.pt; a PTQ run's int8 export."""
    if task == "ptq":
        candidates = [run_dir / "export" / "model_int8.pt"]
    else:
        candidates = ([run_dir / "averaged.pt"] if task == "classification" else []) + [
            run_dir / "checkpoints" / "last.pt"]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"{run_dir}: a run directory without weights (looked for "
                    f"{', '.join(str(c.relative_to(run_dir)) for c in candidates)}); train the run first, "
                    "or pass a weights file with --recipe")


def resolve(path: str | Path, recipe: str | Path | None = None, data_root: str | None = None) -> Source:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or weights file")
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path}: not a run directory (no config.yaml); for a bare weights file pass --recipe")
        recipe_path = Path(recipe) if recipe else path / "config.yaml"
        task, cfg = load_recipe(recipe_path, data_root)
        weights, run_dir = run_weights(path, task), path
    else:
        if recipe is None:
            raise UserError(f"{path}: a weights file needs --recipe (the recipe it was trained with), or "
                            "pass its run directory")
        recipe_path = Path(recipe)
        if not recipe_path.is_file():
            raise UserError(f"--recipe {recipe_path}: no such file")
        task, cfg = load_recipe(recipe_path, data_root)
        weights, run_dir = path, None
    return Source(task, cfg, recipe_path, weights, checkpoint.file_sha256(weights), run_dir)


# ============================================================================ the PyTorch model


def read_checkpoint(src: Source) -> dict:
    try:
        ckpt = checkpoint.load(src.weights)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    stored = ckpt.get("config")
    if isinstance(stored, dict):  # a project checkpoint says what trained it
        where = f"{src.weights}"
        stored_task = task_of(stored, where)
        stored_name = (stored.get("model") or {}).get("name")
        if stored_task != src.task and {stored_task, src.task} != {"qat", "ptq"} or stored_name != src.model_name:
            raise UserError(f"{src.weights}: a checkpoint of another recipe: it was trained as {stored_task} "
                            f"{stored_name}, but {src.recipe} is {src.task} {src.model_name}")
    return ckpt


def _fit(model: nn.Module, state: dict, src: Source, what: str) -> None:
    from models.weights import fit

    try:
        fit(model, state, str(src.weights), what)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def build_float(src: Source) -> nn.Module:
    """The float model of a classification, detection or segmentation source, weights loaded, eval mode."""
    from models.weights import read_state

    s = script(src.task)
    cfg = src.cfg
    read_checkpoint(src)
    if src.task == "classification":
        model = s.build_model(cfg)
    elif src.task == "detection":
        model = s.build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None)),
                              backbone=False)
    else:
        model = s.build_model(dataclasses.replace(cfg.model, weights=None), backbone=False)
    _fit(model, read_state(src.weights), src, f"{src.model_name} ({src.recipe})")
    return model.eval()


def build_int8(src: Source) -> nn.Module:
    """The eager int8 model (qnnpack/x86/fbgemm as the recipe says) of a QAT checkpoint, or a PTQ run's
    int8 TorchScript export as loaded: the model the published QAT/PTQ rows evaluate."""
    from models import quantize
    from models.weights import read_state

    backend = src.cfg.qat.backend
    if quantize.export_file(src.weights) is not None:
        try:
            model, _ = quantize.load_int8(src.weights)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return model
    read_checkpoint(src)
    state = read_state(src.weights)
    if not quantize.is_qat_state_dict(state):
        raise UserError(f"{src.weights}: float weights, not a QAT checkpoint: {src.recipe} is a {src.task} recipe "
                        "(export float weights with a classification recipe)")
    model = script("qat").build_model(src.cfg)
    quantize.prepare_qat(model, backend, src.cfg.qat.se_gate)
    _fit(model, state, src, f"the QAT-prepared MobileNetV3-Large (qat.se_gate={src.cfg.qat.se_gate})")
    return quantize.convert_int8(model, backend)


def float_weights_of_qat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float MobileNetV3-Large state dict inside a QAT (fake-quant) state dict: the trained weights and
    BatchNorm statistics without observers and fake-quant parameters. Fusion moved each BatchNorm into its
    conv (`X.0.bn.*`, the BN was `X.1.*`); SE's fc1+ReLU keeps its keys."""
    out = {}
    for k, v in state.items():
        if "activation_post_process" in k or "fake_quant" in k or k.startswith(("quant.", "dequant.")):
            continue
        out[k.replace(".0.bn.", ".1.")] = v
    return out


def build_qat_float(src: Source) -> nn.Module:
    """The float MobileNetV3-Large carrying the eager QAT run's trained weights (the PT2E int8 path for QAT:
    the published eager row stays as it is), or, for PTQ, the float weights PTQ started from."""
    from models.weights import read_state

    from models import build

    cfg = src.cfg
    model = build("mobilenet_v3_large", num_classes=cfg.model.num_classes, dropout=cfg.model.dropout,
                  norm_layer=partial(nn.BatchNorm2d, eps=0.001))
    if src.task == "ptq":
        weights = Path(cfg.model.weights)
        if not weights.is_file():
            raise UserError(f"{src.recipe}: model.weights {weights} (the float weights PTQ calibrated) not found; "
                            "PT2E quantizes from them")
        _fit(model, read_state(weights), dataclasses.replace(src, weights=weights), "MobileNetV3-Large (float)")
        return model.eval()
    from models import quantize

    read_checkpoint(src)
    state = read_state(src.weights)
    if not quantize.is_qat_state_dict(state):
        raise UserError(f"{src.weights}: float weights, not a QAT checkpoint")
    _fit(model, float_weights_of_qat(state), src, "MobileNetV3-Large (float weights of the QAT checkpoint)")
    return model.eval()
