"""report.md and tools/report.py: measured beside published, the verdicts, the published order.

Run directories are written by hand (each task, values inside and outside the tolerance) except one:
a real 2-epoch toy run of recipes/large.yaml followed by a real `average_checkpoints.py --eval`.
Differences are recomputed here from the numbers the test wrote, not read back from the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reproduce import published
from reproduce import report as rp
from tests.conftest import ROOT
from tools import report as tool


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip()[1:-1].split(" | ")]


def _row(line_start: str, text: str) -> list[str]:
    """The cells of the one Markdown table line of `text` that starts with `| line_start |`."""
    hits = [line for line in text.splitlines() if line.startswith(f"| {line_start} |")]
    assert len(hits) == 1, f"{len(hits)} lines start with {line_start!r} in:\n{text}"
    return _cells(hits[0])


def _recipe(rel: str) -> dict:
    return yaml.safe_load((ROOT / rel).read_text())


def make_run(path: Path, *, script: str, recipe: str | None, config: dict, rows: list[dict] = (),
             overrides: tuple[str, ...] = (), env: dict | None = None, evaluation: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    argv = [f"/src/{script}"] + (["--recipe", f"/src/{recipe}"] if recipe else []) + list(overrides)
    world = (config.get("run") or {}).get("world_size") or 1
    base = {"python": "3.11.7", "torch": "2.14.1", "torchvision": "0.29.1", "git_commit": "abc123", "argv": argv,
            "world_size": world, "device": "cuda:0", "gpus": ["NVIDIA V100-SXM2-32GB"] * world, "cuda": "13.0",
            "hostname": "node1", "derived": {"global_batch": (config.get("run") or {}).get("global_batch")}}
    (path / "env.json").write_text(json.dumps({**base, **(env or {})}))
    if rows:
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluation is not None:
        (path / "eval.json").write_text(json.dumps(evaluation))
    return path


def _large_run(path: Path, averaged: bool = True) -> Path:
    rows = [{"epoch": 597, "acc1": 73.70, "acc5": 91.10}, {"epoch": 598, "acc1": 73.95, "acc5": 91.20},
            {"epoch": 599, "acc1": 73.90, "acc5": 91.25}]
    if averaged:
        rows.append({"epoch": 599, "row": "checkpoint averaging", "acc1": 74.20, "acc5": 91.00,
                     "averaged_epochs": [565, 580, 591], "rule": "last-improved:3 on acc1 (max)"})
    return make_run(path, script="train_classification.py", recipe="recipes/large.yaml",
                    config=_recipe("recipes/large.yaml"), rows=rows, overrides=("data.root=/data/imagenet",))


# ============================================================================ the verdict rule


def test_tolerance_boundaries():
    acc1 = published.TASK_METRICS["classification"][0]
    assert rp.compare_value(acc1, 74.042 + 0.2, 74.042).verdict == "within ±0.2"          # exactly the tolerance
    assert rp.compare_value(acc1, 74.042 - 0.2, 74.042).within is True
    assert rp.compare_value(acc1, 74.243, 74.042).verdict == "above (outside ±0.2)"
    assert rp.compare_value(acc1, 73.841, 74.042).verdict == "below (outside ±0.2)"
    miou = published.TASK_METRICS["segmentation"][0]
    assert rp.compare_value(miou, 57.9 - 0.3, 57.9).within is True
    assert rp.compare_value(miou, 57.9 - 0.31, 57.9).within is False
    assert rp.compare_value(acc1, 70.0, None).verdict == "no published number"
    assert (published.ACC_TOLERANCE, published.MAP_TOLERANCE) == (0.2, 0.3)


# ============================================================================ report.md, one task each


def test_classification_report_compares_the_averaging_row(tmp_path):
    run = _large_run(tmp_path / "large")
    text = rp.write_run_report(run).read_text()
    assert text.startswith("# Reproduction report: MobileNetV3-Large (IMAGENET1K_V1)")
    label = "checkpoint averaging: last-improved:3 on acc1 (max), epochs 565, 580, 591"
    assert _row(label + " | Acc@1", text) == [label, "Acc@1", "74.200", "74.042", f"{74.20 - 74.042:+.3f}",
                                             "**within ±0.2** (compared)"]
    assert _row(label + " | Acc@5", text)[2:] == ["91.000", "91.340", f"{91.00 - 91.340:+.3f}",
                                                 "**below (outside ±0.2)** (compared)"]
    assert _row("last epoch (599) | Acc@1", text)[2:] == ["73.900", "74.042", f"{73.90 - 74.042:+.3f}", "not compared"]
    assert _row("best epoch (598) | Acc@1", text)[2] == "73.950"
    assert "**Verdict: within ±0.2**" in text
    assert "the run's setting is the recipe's" in text                  # 8 processes, global batch 1024, fp32
    assert _row("world size", text)[1] == "8 (recipe: 8)"
    assert _row("device", text)[1] == "cuda:0 (8 x NVIDIA V100-SXM2-32GB)"
    assert _row("versions", text)[1] == "python 3.11.7, torch 2.14.1, torchvision 0.29.1, cuda 13.0"
    assert _row("commit", text)[1] == "abc123"
    assert "within** when |measured - published| <= tolerance" in text   # the rule stands in the report


def test_before_averaging_the_report_is_pending_and_says_how(tmp_path):
    run = _large_run(tmp_path / "large", averaged=False)
    s = rp.summarize(run)
    assert (s.status, s.compared, s.pending) == ("pending", None, "not averaged yet")
    text = rp.write_run_report(run).read_text()
    assert _row("last epoch (599) | Acc@1", text)[2:4] == ["73.900", "74.042"]
    assert f"`python average_checkpoints.py --run {run} --select last-improved:3 --metric acc1 --out " \
           f"{run / 'averaged.pt'} --eval --export`" in text


def test_comparability_lists_what_differs_from_the_published_setting(tmp_path):
    cfg = _recipe("recipes/large.yaml")
    cfg["train"]["tf32"], cfg["train"]["amp"] = True, "bf16"
    run = make_run(tmp_path / "r", script="train_classification.py", recipe="recipes/large.yaml", config=cfg,
                   rows=[{"epoch": 0, "acc1": 1.0, "acc5": 5.0}], env={"world_size": 2, "derived": {
                       "global_batch": 256, "accumulate": 1}},
                   overrides=("schedule.epochs=1", "data.root=/x", "run.output_dir=/y", "train.amp=bf16"))
    notes = rp.summarize(run).notes
    assert "global batch 256 (2 x 128 x accumulate 1), the recipe's is 1024" in notes
    assert "train.amp=bf16: the published runs were fp32" in notes
    assert any(n.startswith("train.tf32=true") for n in notes)
    assert "command-line overrides that change the recipe: `schedule.epochs=1` `train.amp=bf16`" in notes
    assert "incomplete: 1 of 600 epochs done" in notes


def test_qat_report_compares_int8_and_shows_fake_quant(tmp_path):
    cfg = {"schedule": {"epochs": 90}, "run": {"world_size": 8, "global_batch": 256},
           "expected": {"acc1": 73.004, "acc5": 90.858, "source": "torchvision quantized weights"}}
    run = make_run(tmp_path / "qat", script="train_qat.py", recipe="recipes/qat/some_name.yaml", config=cfg, rows=[
        {"epoch": 88, "acc1": 73.4, "acc5": 91.1, "int8_acc1": 72.7, "int8_acc5": 90.7},
        {"epoch": 89, "acc1": 73.5, "acc5": 91.0, "int8_acc1": 72.9, "int8_acc5": 90.5}])
    s = rp.summarize(run)
    assert (s.task, s.row.name, s.status) == ("qat", "QAT, int8 (IMAGENET1K_QNNPACK_V1)", "within ±0.2")
    text = rp.write_run_report(run).read_text()
    assert _row("last epoch (89) | int8 Acc@1", text)[2:] == ["72.900", "73.004", f"{72.9 - 73.004:+.3f}",
                                                            "**within ±0.2** (compared)"]
    assert _row("last epoch (89) | int8 Acc@5", text)[5] == "**below (outside ±0.2)** (compared)"
    assert _row("last epoch (89) | fake-quant Acc@1", text)[2:] == ["73.500", "-", "-", "not published"]


def test_detection_low_res_compares_epoch_23_high_res_the_last(tmp_path):
    rows = [{"epoch": e, "bbox_map": m} for e, m in ((22, 22.1), (23, 22.6), (24, 22.3), (25, 22.0))]
    low = make_run(tmp_path / "low", script="train_detection.py",
                   recipe="recipes/detection/fasterrcnn_mobilenet_v3_large_320_fpn.yaml",
                   config={"schedule": {"epochs": 26}, "expected": {"bbox_map": 22.8}}, rows=rows)
    s = rp.summarize(low)
    assert (s.row.name, s.compared.label, s.status) == ("Low-res 320, 320-640 px (COCO_V1)", "epoch 23", "within ±0.3")
    text = rp.write_run_report(low).read_text()
    assert _row("epoch 23 | box mAP", text)[2:] == ["22.600", "22.8", f"{22.6 - 22.8:+.3f}",
                                                   "**within ±0.3** (compared)"]
    assert _row("last epoch (25) | box mAP", text)[5] == "not compared"
    high = make_run(tmp_path / "high", script="train_detection.py", recipe="recipes/detection/whatever.yaml",
                    config={"schedule": {"epochs": 26}, "expected": {"bbox_map": 32.8}},
                    rows=[{"epoch": 24, "bbox_map": 32.6}, {"epoch": 25, "bbox_map": 32.4}])
    s = rp.summarize(high)
    assert (s.row.name, s.compared.label, s.status) == ("High-res, 800-1333 px (COCO_V1)", "last epoch (25)",
                                                        "below (outside ±0.3)")
    short = make_run(tmp_path / "short", script="train_detection.py", recipe=None,  # a 3-epoch run never has epoch 23
                     config={"schedule": {"epochs": 3}, "expected": {"bbox_map": 22.8}},
                     rows=[{"epoch": 2, "bbox_map": 1.5}])
    assert rp.summarize(short).compared.label == "last epoch (2)"
    running = make_run(tmp_path / "running", script="train_detection.py", recipe=None,
                       config={"schedule": {"epochs": 26}, "expected": {"bbox_map": 22.8}},
                       rows=[{"epoch": 10, "bbox_map": 15.0}])
    assert rp.summarize(running).pending == "epoch 23 not reached yet"


def test_the_23_0_row_measures_the_epoch_23_checkpoint_as_the_22_8_row(tmp_path):
    """The blog's before/after RPN tuning rows are one model, torchvision's epoch-23 checkpoint of a 26-epoch
    run: a training run of the before-tuning recipe is compared at epoch 23 (not its last epoch), an eval-only
    run at its result, with a caveat when it evaluated another epoch's file. One rule, shared."""
    before = published.row_by_name("Low-res, before RPN NMS tuning (test-time RPN top-n 1000/1000)")
    after = published.row_by_name("Low-res 320, 320-640 px (COCO_V1)")
    assert before.measure == after.measure == "epoch 23" and before.weights_of == after.name
    for row in published.PUBLISHED:
        if row.weights_of:
            assert row.measure == published.row_by_name(row.weights_of).measure and row.variant, row.name
    assert [r.measure for r in published.PUBLISHED if r.table == published.SEG_LOWRES] == ["epoch 28", "epoch 28", "last"]
    rows = [{"epoch": e, "bbox_map": m} for e, m in ((22, 22.5), (23, 23.1), (24, 22.4), (25, 22.2))]
    recipe = "recipes/detection/fasterrcnn_mobilenet_v3_large_320_fpn_no_rpn_tuning.yaml"
    trained = make_run(tmp_path / "trained", script="train_detection.py", recipe=recipe,
                       config={"schedule": {"epochs": 26}, "expected": {"bbox_map": 23.0}}, rows=rows)
    s = rp.summarize(trained)
    assert (s.row, s.compared.label, s.status) == (before, "epoch 23", "within ±0.3")
    evaluated = make_run(tmp_path / "eval", script="train_detection.py", recipe=recipe,
                         config={"expected": {"bbox_map": 23.0}}, overrides=("run.eval_only=true",),
                         evaluation={"weights": "runs/low/checkpoints/epoch_023.pt", "bbox_map": 22.9})
    s = rp.summarize(evaluated)
    assert (s.row, s.compared.kind, s.status, s.notes) == (before, "eval", "within ±0.3", [])
    assert "the weights of the row \"Low-res 320" in rp.write_run_report(evaluated).read_text()
    wrong = make_run(tmp_path / "wrong", script="train_detection.py", recipe=recipe,
                     config={"expected": {"bbox_map": 23.0}},
                     evaluation={"weights": "runs/low/checkpoints/epoch_025.pt", "bbox_map": 22.9})
    assert rp.summarize(wrong).notes == ["evaluated epoch_025.pt; the published number is of the epoch 23 "
                                         "checkpoint"]


def test_segmentation_report_and_low_res_eval(tmp_path):
    rows = [{"epoch": 27, "miou": 57.0, "pixel_acc": 91.0}, {"epoch": 28, "miou": 57.7, "pixel_acc": 91.6},
            {"epoch": 29, "miou": 58.5, "pixel_acc": 91.3}]
    run = make_run(tmp_path / "lraspp", script="train_segmentation.py", recipe="recipes/segmentation/lraspp.yaml",
                   config={"schedule": {"epochs": 30}, "expected": {"miou": 57.9, "pixel_acc": 91.2}}, rows=rows)
    s = rp.summarize(run)
    assert (s.row.name, s.compared.label, s.status) == (
        "LR-ASPP MobileNetV3-Large (COCO_WITH_VOC_LABELS_V1)", "epoch 28", "within ±0.3")
    text = rp.write_run_report(run).read_text()
    assert _row("epoch 28 | pixel acc", text)[2:] == ["91.600", "91.2", f"{91.6 - 91.2:+.3f}",
                                                     "**above (outside ±0.3)** (compared)"]
    low = make_run(tmp_path / "low", script="train_segmentation.py", recipe=None, config={
        "expected": {"miou": 55.8, "pixel_acc": 90.3}}, evaluation={"weights": "w.pth", "miou": 55.5,
                                                                   "pixel_acc": 90.2, "iou": [50.0] * 21})
    s = rp.summarize(low)
    assert (s.row.name, s.compared.kind, s.status) == ("LR-ASPP, eval at 320 px", "eval", "within ±0.3")


def test_expected_overridden_to_another_rows_numbers_moves_the_run_there(tmp_path):
    cfg = _recipe("recipes/large.yaml")
    cfg["expected"].update(acc1=73.86, acc5=91.292)                     # the recipe's run, reported as row 4
    run = make_run(tmp_path / "r", script="train_classification.py", recipe="recipes/large.yaml", config=cfg,
                   rows=[{"epoch": 599, "acc1": 73.8, "acc5": 91.3}])
    assert rp.summarize(run).row.name == "4. + data augmentation & tuned hyperparameters"
    cfg["expected"].update(acc1=70.0)                                   # no row's numbers: the recipe's row
    run = make_run(tmp_path / "s", script="train_classification.py", recipe="recipes/large.yaml", config=cfg,
                   rows=[{"epoch": 599, "acc1": 73.8, "acc5": 91.3}])
    s = rp.summarize(run)
    assert s.row.name == "MobileNetV3-Large (IMAGENET1K_V1)"
    assert s.notes[0].startswith("this run's `expected:` differs from the published row: expected.acc1 70.0")


def test_eval_only_directory_with_eval_json_alone(tmp_path):
    run = tmp_path / "eval"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"weights": "mobilenet_v3_large-8738ca79.pth", "acc1": 74.05,
                                               "acc5": 91.33, "val_images": 50000,
                                               "expected": {"acc1": 74.042, "acc5": 91.34, "source": "tv"}}))
    text = rp.write_run_report(run).read_text()
    label = "eval-only: mobilenet_v3_large-8738ca79.pth"
    assert _row(label + " | Acc@1", text)[2:] == ["74.050", "74.042", f"{74.05 - 74.042:+.3f}",
                                                 "**within ±0.2** (compared)"]


def test_toy_recipe_reports_measured_values_without_a_published_number(tmp_path):
    run = make_run(tmp_path / "toy", script="train_classification.py", recipe="recipes/toy/classification.yaml",
                   config=_recipe("recipes/toy/classification.yaml"), env={"device": "cpu", "gpus": None},
                   rows=[{"epoch": 0, "acc1": 40.0, "acc5": 90.0}, {"epoch": 1, "acc1": 61.0, "acc5": 97.0}])
    s = rp.summarize(run)
    assert (s.row, s.status) == (None, "no published number")
    text = rp.write_run_report(run).read_text()
    assert _row("last epoch (1) | Acc@1", text)[2:] == ["61.000", "-", "-", "no published number"]
    assert _row("device", text)[1] == "cpu" and _row("epochs", text)[1] == "2 done of 20"


# ============================================================================ the published rows


def test_published_rows_agree_with_torchvision_metadata():
    import torchvision.models as tvm
    from torchvision.models import detection, quantization, segmentation

    weights = {
        "MobileNetV3-Large (IMAGENET1K_V1)": tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        "MobileNetV3-Small (IMAGENET1K_V1)": tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
        "QAT, int8 (IMAGENET1K_QNNPACK_V1)": quantization.MobileNet_V3_Large_QuantizedWeights.IMAGENET1K_QNNPACK_V1,
        "High-res, 800-1333 px (COCO_V1)": detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
        "Low-res 320, 320-640 px (COCO_V1)": detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
        "LR-ASPP MobileNetV3-Large (COCO_WITH_VOC_LABELS_V1)":
            segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
        "DeepLabV3 MobileNetV3-Large (COCO_WITH_VOC_LABELS_V1)":
            segmentation.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    }
    names = {"acc@1": "acc1", "acc@5": "acc5", "box_map": "bbox_map", "miou": "miou", "pixel_acc": "pixel_acc"}
    for name, w in weights.items():
        (meta,) = w.meta["_metrics"].values()
        assert published.row_by_name(name).values == {names[k]: v for k, v in meta.items()}, name


def test_comparison_rows_are_torchvision_metadata_not_the_blog_rounding():
    rows = {name: values for _, name, values, _ in published.comparison_rows()}
    assert rows["MobileNetV2"] == {"acc1": 71.878, "acc5": 90.286}
    assert rows["ResNet50"] == {"acc1": 76.130, "acc5": 92.862}
    assert rows["ResNet18"] == {"acc1": 69.758, "acc5": 89.078}
    assert "71.878 / 90.286 | torchvision MobileNet_V2_Weights.IMAGENET1K_V1 metadata" in tool.comparisons_table()


def test_every_published_recipe_maps_to_one_published_row():
    recipes = tool.recipes_by_row(ROOT)
    mapped = [r for paths in recipes.values() for r in paths]
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        rel = path.relative_to(ROOT).as_posix()
        expected = (_recipe(rel).get("expected") or {})
        if rel.startswith("recipes/toy/"):
            assert rel not in mapped
            continue
        assert rel in mapped, f"{rel}: its expected {expected} is no published row's"
        row = published.match_row(rel, None, expected)
        assert all(expected.get(k) == v for k, v in row.values.items()), rel
    assert recipes["6. + label smoothing, stochastic depth, LR noise (not released)"] == [
        "recipes/ablation/6_label_smoothing_sd_lr_noise.yaml", "recipes/large_improved.yaml"]
    assert recipes["MobileNetV3-Large (IMAGENET1K_V1)"] == ["recipes/large.yaml"]


def test_large_improved_is_not_called_published():
    row = published.row_by_name("6. + label smoothing, stochastic depth, LR noise (not released)")
    assert "never published" in row.note and "0.2 * (i+1)/15" in row.note
    for rel in ("recipes/large_improved.yaml", "recipes/ablation/6_label_smoothing_sd_lr_noise.yaml"):
        text = (ROOT / rel).read_text()
        assert "never published their hyperparameters" in text and "0.2 * idx/16" in text, rel
        assert "ours" in _recipe(rel)["expected"]["source"]


# ============================================================================ tools/report.py


def _fleet(root: Path) -> dict[str, Path]:
    runs = {"large": _large_run(root / "large")}
    runs["row1"] = make_run(root / "ablation/row1", script="train_classification.py",
                            recipe="recipes/ablation/1_baseline_mobilenetv2_style.yaml",
                            config=_recipe("recipes/ablation/1_baseline_mobilenetv2_style.yaml"),
                            rows=[{"epoch": 299, "acc1": 71.2, "acc5": 90.0}])
    runs["qat"] = make_run(root / "qat", script="train_qat.py", recipe=None,
                           config={"schedule": {"epochs": 90}, "expected": {"acc1": 73.004, "acc5": 90.858}},
                           rows=[{"epoch": 89, "acc1": 73.5, "acc5": 91.0, "int8_acc1": 72.9, "int8_acc5": 90.9}])
    runs["det"] = make_run(root / "det", script="train_detection.py", recipe=None,
                           config={"schedule": {"epochs": 26}, "expected": {"bbox_map": 22.8}},
                           rows=[{"epoch": 23, "bbox_map": 22.75}, {"epoch": 25, "bbox_map": 22.5}])
    runs["seg"] = make_run(root / "seg", script="train_segmentation.py", recipe=None,
                           config={"schedule": {"epochs": 30}, "expected": {"miou": 57.9, "pixel_acc": 91.2}},
                           rows=[{"epoch": 28, "miou": 57.0, "pixel_acc": 91.0}])
    runs["toy"] = make_run(root / "toy", script="train_classification.py", recipe="recipes/toy/classification.yaml",
                           config=_recipe("recipes/toy/classification.yaml"),
                           rows=[{"epoch": 19, "acc1": 89.0, "acc5": 98.0}])
    return runs


def test_tool_table_follows_the_published_order_and_marks_missing_rows(tmp_path, capsys):
    runs = _fleet(tmp_path / "runs")
    out = tmp_path / "report.md"
    text = tool.main([str(tmp_path / "runs"), "--out", str(out)])  # a folder of runs: found 3 levels deep
    assert out.read_text() == text
    lines = text.splitlines()
    # every published row once, in the catalogue's order, and the catalogue in the published tables' order
    positions = [next(i for i, line in enumerate(lines) if line.startswith(f"| {row.name}")) for row in published.PUBLISHED]
    assert positions == sorted(positions)
    assert [r.table for r in published.PUBLISHED] == sorted((r.table for r in published.PUBLISHED), key=published.TABLES.index)
    assert [r.name.split(".")[0] for r in published.PUBLISHED[:6]] == ["1", "2", "3", "4", "5", "6"]
    sections = [next(i for i, line in enumerate(lines) if line.startswith(f"| **{t}**")) for t in published.TABLES]
    assert sections == sorted(sections) and sections[0] < positions[0]
    no_run = {line.split(" | ")[0].lstrip("| ").split(" [")[0] for line in lines if "| no run yet |" in line}
    assert no_run == {r.name for r in published.PUBLISHED} - {
        "1. Baseline, MobileNetV2-style hyperparameters", "MobileNetV3-Large (IMAGENET1K_V1)",
        "QAT, int8 (IMAGENET1K_QNNPACK_V1)", "Low-res 320, 320-640 px (COCO_V1)",
        "LR-ASPP MobileNetV3-Large (COCO_WITH_VOC_LABELS_V1)"}

    def run_lines(run: Path) -> list[int]:
        return [i for i, line in enumerate(lines) if f"| `{run}` |" in line]

    large = published.row_by_name("MobileNetV3-Large (IMAGENET1K_V1)")
    at = positions[published.PUBLISHED.index(large)]
    assert run_lines(runs["large"]) == [at, at + 1]                # last epoch, then the averaging row of its own
    cells = _cells(lines[at + 1])
    assert cells[:5] == ["", "", "", "", f"`{runs['large']}`"]
    assert cells[5] == "checkpoint averaging: last-improved:3 on acc1 (max), epochs 565, 580, 591"
    assert cells[6:8] == ["74.200 / 91.000", f"{74.2 - 74.042:+.3f} / {91.0 - 91.34:+.3f}"]
    assert cells[8] == "**within ±0.2**; Acc@5 below (outside ±0.2)"
    assert _cells(lines[at])[5:] == ["last epoch (599)", "73.900 / 91.250", "-0.142 / -0.090", "not compared"]
    det = [_cells(lines[i])[5:] for i in run_lines(runs["det"])]
    assert det == [["last epoch (25)", "22.500", f"{22.5 - 22.8:+.3f}", "not compared"],
                   ["epoch 23", "22.750", f"{22.75 - 22.8:+.3f}", "**within ±0.3**"]]
    other = next(i for i, line in enumerate(lines) if line.startswith("| **Other runs (no published row)**"))
    assert run_lines(runs["toy"]) == [other + 1] and other > max(positions)
    assert "| `recipes/toy/classification.yaml` | Acc@1 / Acc@5 | - / - |" in lines[other + 1]


def test_tool_plot_draws_measured_against_published(tmp_path):
    runs = _fleet(tmp_path / "runs")
    summaries = [rp.summarize(r) for r in runs.values()]
    png = tmp_path / "plot.png"
    points = tool.plot(summaries, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted((p[1], p[2], p[3]) for p in points) == sorted([
        (74.042, 74.2, 0.2), (71.542, 71.2, 0.2), (73.004, 72.9, 0.2), (22.8, 22.75, 0.3), (57.9, 57.0, 0.3)])


def test_tool_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tools/report.py"), str(tmp_path / "empty")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"report.py: error: {tmp_path / 'empty'}: no run directory here" in proc.stderr



@pytest.mark.parametrize("option, value, message", [
    ("--plot", "r.xyz", "--plot {d}/r.xyz: unknown image format .xyz; expected one of .avif, .eps"),
    ("--plot", "r", "--plot {d}/r: unknown image format (no suffix); expected one of"),
    ("--out", "r.png", "--out {d}/r.png: the report is Markdown; expected a file ending in .md, .markdown, .txt"),
    ("--out", "sub", "--out {d}/sub: is a directory; give a file name"),
    ("--plot", "afile/r.png", "--plot {d}/afile/r.png: {d}/afile is a file, not a directory"),
])
def test_tool_bad_out_or_plot_is_one_message_and_exit_2(tmp_path, option, value, message):
    from tests.conftest import run_in_process

    run = _large_run(tmp_path / "run")
    (tmp_path / "sub").mkdir()
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_in_process("tools/report.py", [run, option, tmp_path / value], tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("report.py: error: " + message.format(d=tmp_path)), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == before

# ============================================================================ a real toy run of recipes/large.yaml


@pytest.fixture(scope="module")
def large_toy_run(toy_data, tmp_path_factory) -> Path:
    """recipes/large.yaml on the toy data, made tiny (Small 0.5 at 32 px, 2 epochs)."""
    out = tmp_path_factory.mktemp("large_toy") / "run"
    args = ["--recipe", str(ROOT / "recipes/large.yaml"), f"data.root={toy_data / 'imagenet'}", f"run.output_dir={out}",
            "model.num_classes=10", "model.name=mobilenet_v3_small", "model.width_mult=0.5", "data.crop_size=32",
            "data.val_resize=36", "data.val_crop=32", "data.workers=0", "data.batch_size=50", "run.global_batch=50",
            "optimizer.lr=0.002", "schedule.epochs=2", "run.print_freq=100"]
    proc = subprocess.run([sys.executable, str(ROOT / "train_classification.py"), *args], capture_output=True,
                          text=True, cwd=out.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_toy_run_of_large_ends_with_74042_beside_its_own_acc1(large_toy_run):
    text = (large_toy_run / "report.md").read_text()  # written by the training run itself
    last = [json.loads(line) for line in (large_toy_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["epoch"] == 1
    assert _row("last epoch (1) | Acc@1", text)[2:5] == [f"{last['acc1']:.3f}", "74.042",
                                                         f"{last['acc1'] - 74.042:+.3f}"]
    assert "**Verdict: pending**" in text
    assert "`model.name=mobilenet_v3_small`" in text                    # not the published setting, and it says so


def test_averaging_row_after_average_checkpoints_eval(large_toy_run, capsys):
    import average_checkpoints as avg

    result = avg.main(["--run", str(large_toy_run), "--select", "last:2", "--metric", "acc1",
                       "--out", str(large_toy_run / "averaged.pt"), "--eval"])
    assert result["report"] == str(large_toy_run / "report.md")
    rows = [json.loads(line) for line in (large_toy_run / "metrics.jsonl").read_text().splitlines()]
    averaged = [r for r in rows if r.get("row") == "checkpoint averaging"]
    assert len(averaged) == 1 and averaged[0]["averaged_epochs"] == [0, 1]
    label = "checkpoint averaging: last:2 on acc1 (max), epochs 0, 1"
    text = (large_toy_run / "report.md").read_text()
    cells = _row(label + " | Acc@1", text)
    assert cells[2:5] == [f"{averaged[0]['acc1']:.3f}", "74.042", f"{averaged[0]['acc1'] - 74.042:+.3f}"]
    assert cells[5].endswith("(compared)")
    table = tool.main([str(large_toy_run)])
    line = next(line for line in table.splitlines() if f"| {label} |" in line)
    assert line.startswith(f"|  |  |  |  | `{large_toy_run}` |")       # its own line, under the Large row
    assert table.splitlines().index(line) == 1 + next(
        i for i, ln in enumerate(table.splitlines()) if ln.startswith("| MobileNetV3-Large (IMAGENET1K_V1) |"))


def test_a_torn_metrics_line_is_skipped_and_said(tmp_path):
    run = _large_run(tmp_path / "large")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 600, "acc1": 7')                            # killed mid-write
    s = rp.summarize(run)
    assert s.status == "within ±0.2" and "metrics.jsonl: 1 unreadable line(s) skipped" in s.notes


def test_engine_does_not_import_the_report_layer():
    """engine/ keeps what training needs: the report, the tables and the launcher (reproduce/) sit above the
    scripts, which hand the report to their run directory."""
    import ast

    for path in sorted((ROOT / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "reproduce"], path
    for script in ("train_classification.py", "train_detection.py", "train_qat.py", "train_segmentation.py"):
        assert "report=write_run_report)" in (ROOT / script).read_text(), script
