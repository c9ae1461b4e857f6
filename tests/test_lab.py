"""The lab's cycle (``cycle init|next|learn|status``): versions and lineage, the fixed test set, the paired
comparison, the promotion rule, resume after a kill, and one error line for each bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from cellseg_pl.__main__ import main
from cellseg_pl.lab import compare
from cellseg_pl.lab.folder import Lab

from conftest import calibrate_batchnorm, fit_args

REPO = Path(__file__).resolve().parents[1]
KILLER = """
import os, signal
import lightning as L

class KillAtEpoch(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
"""


# ------------------------------------------------------------------------------------------------ the comparison
def record(image: str, tp: int, fp: int, fn: int, hits: list[tuple[float, bool]] | None = None) -> dict:
    dets = [[s, 0, [hit] * 10] for s, hit in (hits or [])]
    return {"image": image, "tp": tp, "fp": fp, "fn": fn, "count_err": fp - fn, "gt": {0: tp + fn}, "dets": dets}


def test_mean_ap_by_hand():
    # one image, 2 true cells; detections 0.9 (hit), 0.8 (miss), 0.7 (hit): precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1; the envelope gives 1 up to recall 0.5 and 2/3 above: (51 * 1 + 50 * 2/3) / 101
    r = record("a", 2, 1, 0, [(0.9, True), (0.8, False), (0.7, True)])
    assert compare.mean_ap([r]) == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert compare.f1([r]) == pytest.approx(4 / 5) and compare.count_mae([r]) == 1


def test_paired_bootstrap_and_the_promotion_rule():
    old = [record(f"i{k}", 9, 1, 1, [(0.9, True)] * 9 + [(0.3, False)]) for k in range(20)]
    same = paired_bootstrap_of(old, old)
    assert all(d.delta == 0 and d.low == d.high == 0 for d in same.values())
    assert compare.not_worse(same)[0]
    worse = [record(f"i{k}", 5, 5, 5, [(0.9, True)] * 5 + [(0.8, False)] * 5) for k in range(20)]
    result = paired_bootstrap_of(old, worse)
    ok, why = compare.not_worse(result)
    assert not ok and why.startswith("worse: F1 0.900 -> 0.500 (-0.400)") and result["F1"].high < 0
    better = paired_bootstrap_of(worse, old)
    assert compare.not_worse(better)[0] and better["F1"].low > 0
    with pytest.raises(ValueError, match="different images"):
        compare.paired_bootstrap(old, old[::-1])


def paired_bootstrap_of(a, b):
    return compare.paired_bootstrap(a, b, resamples=200)


# ------------------------------------------------------------------------------------------------ two cycles
def zip_predictions(predictions: Path, out: Path) -> Path:
    """A CVAT "COCO 1.0" export without images, as CVAT writes it (the demo's stand-in for corrections)."""
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("annotations/instances_default.json", predictions.read_text())
    return out


def zip_true_labels(pool: Path, rels: list[str], out: Path) -> Path:
    """The cycle's images "corrected in CVAT": their true outlines (the demo labels) as a COCO 1.0 export, as the
    active-learning benchmark simulates it."""
    from benchmarks.active_learning import true_labels_zip

    return true_labels_zip([pool / rel for rel in rels], {0: "cell"}, out)


@pytest.fixture(scope="module")
def lab_inputs(tmp_path_factory):
    """A first model (1 epoch, BatchNorm calibrated), a pool of 12 images plus a copy of a test image, and a test
    set labelled by the first model's own predictions (so it scores above 0, and a model that finds nothing is
    worse)."""
    from cellseg_pl.data.demo import make_demo_dataset
    from cellseg_pl.infer.predict import predict_folder

    root = tmp_path_factory.mktemp("lab_inputs")
    data = make_demo_dataset(root / "data", n_train=8, n_val=4, size=128, seed=1)
    assert main(fit_args(data, root / "runs", "v1", 1)) == 0
    v1 = root / "runs" / "v1" / "weights" / "best.ckpt"
    calibrate_batchnorm(v1, sorted((data.parent / "images").rglob("*.png")))
    pool = make_demo_dataset(root / "pool_src", n_train=12, n_val=1, size=128, seed=2).parent / "images" / "train"
    test_images = make_demo_dataset(root / "test_src", n_train=4, n_val=1, size=128, seed=3).parent / "images" / "train"
    predict_folder(v1, test_images, root / "test_predictions.json", conf=CONF)
    assert json.loads((root / "test_predictions.json").read_text())["annotations"], "the first model finds nothing"
    (pool / "same_as_a_test_image.png").write_bytes(sorted(test_images.iterdir())[0].read_bytes())
    return {"root": root, "v1": v1, "pool": pool, "test_images": test_images, "data": data,
            "test_zip": zip_predictions(root / "test_predictions.json", root / "test.zip")}


#: operating point of the test lab: a 1-epoch model scores low
CONF = 0.05


def cycle(*args: str) -> int:
    return main(["cycle", *args])


def test_bad_lab_input_is_one_line(lab_inputs, tmp_path, capsys):
    lab = tmp_path / "lab"
    assert cycle("status", "--lab", str(lab)) == 2
    assert "is not a lab folder (no lab.yaml)" in capsys.readouterr().err
    assert cycle("init", "--lab", str(lab), "--model", str(lab_inputs["v1"]), "--pool", str(lab_inputs["pool"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--test-zip: give the fixed test set once" in err
    assert not lab.exists()  # nothing half-made


@pytest.mark.slow
def test_two_cycles_lineage_no_overwrite_kill_resume_and_refusal(lab_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything Ultralytics' validator writes stays here
    lab = tmp_path / "lab"
    assert cycle("init", "--lab", str(lab), "--model", str(lab_inputs["v1"]), "--pool", str(lab_inputs["pool"]),
                 "--test-zip", str(lab_inputs["test_zip"]), "--test-images", str(lab_inputs["test_images"]),
                 "--imgsz", "128", "--epochs", "2", "--batch-size", "4", "--conf", str(CONF)) == 0
    out = capsys.readouterr().out
    assert "v1 adopted, 4 test images" in out
    L = Lab(lab)
    v1 = L.card(1)
    assert v1["parent"] is None and v1["test"]["F1@0.5"] > 0.02 and v1["test"]["ultralytics"]["mAP50(M)"] >= 0
    assert (lab / "models" / "v1.md").read_text().startswith("# Model v1")
    # the bootstrap's mask mAP50-95, from per-image records, is the evaluator's COCO figure
    assert v1["test"]["ci95"]["mAP50-95"][0] == pytest.approx(v1["test"]["mAP50-95(M)"], abs=0.01)
    assert not yaml.safe_load((lab / "test" / "dataset.yaml").read_text())["train"]  # never trained on
    # fast fine-tunes for the test: CPU, no loader workers; for cycle 1 a wide tolerance (a 1-epoch model moves)
    recipe = yaml.safe_load(L.recipe.read_text())
    recipe["trainer"].update(accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0)
    recipe["data"]["num_workers"] = 0
    recipe["model"]["lr0"] = 1e-6
    recipe["trainer"]["callbacks"] = [{"class_path": "killer.KillAtEpoch"}]
    L.recipe.write_text(yaml.safe_dump(recipe))
    settings = yaml.safe_load(L.settings_file.read_text())
    L.settings_file.write_text(yaml.safe_dump({**settings, "tolerance": 0.5}))

    # cycle 1: the 4 images the model is least sure of, never the pool's copy of a test image
    assert cycle("next", "--lab", str(lab), "--k", "4", "--no-tta") == 0
    s1 = L.state(1)
    assert len(s1["images"]) == 4 and "same_as_a_test_image.png" not in s1["images"]
    assert (lab / "cycles" / "cycle1" / "predictions.json").is_file()
    assert cycle("next", "--lab", str(lab), "--k", "4") == 2
    assert "cycle 1 still waits for its corrections" in capsys.readouterr().err
    z1 = zip_true_labels(lab_inputs["pool"], s1["images"], tmp_path / "cycle1_corrected.zip")

    # learn, killed (kill -9) in the middle of the fine-tune, then run again: it resumes the fit
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    killed = subprocess.run([sys.executable, "-m", "cellseg_pl", "cycle", "learn", "--lab", str(lab), "--corrected",
                             str(z1)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert L.state(1)["step"] == "converted" and (lab / "cycles/cycle1/run/weights/last.ckpt").is_file()
    del recipe["trainer"]["callbacks"]
    L.recipe.write_text(yaml.safe_dump(recipe))
    assert cycle("learn", "--lab", str(lab), "--corrected", str(z1)) == 0
    assert "v2 promoted" in capsys.readouterr().out
    rows = (lab / "cycles/cycle1/run/results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # epoch 2 resumed after the kill
    v2 = L.card(2)
    assert v2["parent"] == "v1" and v2["cycle"] == 1 and L.current() == 2
    assert v2["trained_on"][-1]["zip_sha256"] and v2["trained_on"][-1]["train"] + v2["trained_on"][-1]["val"] == 4
    assert [t["set"] for t in v2["trained_on"][1:]] == ["cycle 1"]
    assert set(v2["vs_parent"]) == {"F1", "mAP50-95", "count_MAE"} and "ci95" in v2["vs_parent"]["F1"]
    assert "--model.model" in v2["command"] and v2["config"] == "cycles/cycle1/run/config.yaml"
    v1_bytes = L.model(1).read_bytes()

    # cycle 2: random picks, disjoint from cycle 1's; the old zip is refused; a broken fine-tune is not promoted
    assert cycle("next", "--lab", str(lab), "--k", "4", "--random") == 0
    s2 = L.state(2)
    assert len(s2["images"]) == 4 and not set(s2["images"]) & set(s1["images"]) and s2["model"] == "v2"
    assert "same_as_a_test_image.png" not in s2["images"]
    assert cycle("learn", "--lab", str(lab), "--corrected", str(z1)) == 2
    assert "is cycle 1's export, given again" in capsys.readouterr().err
    z2 = zip_true_labels(lab_inputs["pool"], s2["images"], tmp_path / "cycle2_corrected.zip")
    # an export without a single cell: refused, unless the images really are background (--allow-empty)
    empty = tmp_path / "cycle2_empty.zip"
    with zipfile.ZipFile(z2) as zin, zipfile.ZipFile(empty, "w") as zout:
        coco = json.loads(zin.read("annotations/instances_default.json"))
        zout.writestr("annotations/instances_default.json", json.dumps({**coco, "annotations": []}))
    assert cycle("learn", "--lab", str(lab), "--corrected", str(empty)) == 2
    err = capsys.readouterr().err
    assert "no instance to write" in err and "--allow-empty" in err and err.count("\n") == 1
    assert L.state(2)["step"] == "labelling" and "zip" not in L.state(2)  # nothing recorded: give the right zip
    assert cycle("learn", "--lab", str(lab)) == 2
    assert "--corrected: cycle 2 waits for CVAT's export" in capsys.readouterr().err

    import cellseg_pl.lab.cycle as cycle_module

    real = cycle_module._fine_tune

    def broken_fine_tune(lab_, n, state):  # a fine-tune that unlearned everything: no cell scores above 1e-20
        real(lab_, n, state)
        path = lab_.cycle_dir(n) / "run" / "weights" / "best.ckpt"
        ckpt = torch.load(path, weights_only=True)
        for k, v in ckpt["state_dict"].items():
            if k.startswith("ema.module.model.22.cv3.") and k.endswith("2.bias"):
                v.fill_(-50.0)
        torch.save(ckpt, path)

    monkeypatch.setattr(cycle_module, "_fine_tune", broken_fine_tune)
    # the default tolerance, 0.005; and a labelled set added by hand to lab.yaml (trained on from now on)
    L.settings_file.write_text(yaml.safe_dump({**settings, "labelled": [str(lab_inputs["data"])]}))
    assert L.card(2)["test"]["F1@0.5"] > 0.01
    assert cycle("learn", "--lab", str(lab), "--corrected", str(z2)) == 0
    out = capsys.readouterr().out
    assert "not promoted (worse: F1" in out and L.current() == 2 and L.versions() == [1, 2]
    assert L.model(1).read_bytes() == v1_bytes  # no model file is ever rewritten

    # cycle 3: broken again and refused; then promoted after all with --force alone: its card says so
    assert cycle("next", "--lab", str(lab), "--k", "4", "--random") == 0
    z3 = zip_true_labels(lab_inputs["pool"], L.state(3)["images"], tmp_path / "cycle3_corrected.zip")
    assert cycle("learn", "--lab", str(lab), "--corrected", str(z3)) == 0
    assert "not promoted" in capsys.readouterr().out and L.current() == 2
    assert cycle("learn", "--lab", str(lab), "--force") == 0
    assert "v3 FORCED" in capsys.readouterr().out and L.current() == 3
    assert cycle("learn", "--lab", str(lab), "--force") == 2  # once only
    assert "the last cycle has no fine-tune that was refused" in capsys.readouterr().err
    assert L.card(3)["decision"].startswith("FORCED with --force although worse: F1") and L.card(3)["parent"] == "v2"
    assert "FORCED" in (lab / "models" / "v3.md").read_text()
    # v3 trained on cycle 2's labels too (kept although cycle 2's model was not promoted)
    sets = ["labelled before the lab", "cycle 1", "cycle 2", "cycle 3"]
    assert [t["set"] for t in L.card(3)["trained_on"][1:]] == sets
    assert L.card(3)["trained_on"][1]["train"] == 8 and "labelled before the lab" in (lab / "models" / "v3.md").read_text()
    # the pool is used up (its copy of a test image is never offered)
    assert cycle("next", "--lab", str(lab), "--k", "4") == 2
    assert "has no image left that is not labelled or in the test set" in capsys.readouterr().err

    assert cycle("status", "--lab", str(lab)) == 0
    table = capsys.readouterr().out
    assert "| v1 | - | 0 |" in table and "| v2 | v1 | 1 |" in table and "| v3 (current) | v2 | 3 |" in table
    assert "cycle 2: labels kept, model not promoted" in table
    # the next fine-tune trains on both cycles' labels (cycle 2's corrections are kept)
    labelled = yaml.safe_load(L.labelled_yaml.read_text())
    assert sum("cycle1" in p for p in labelled["train"] + labelled["val"]) >= 1
    assert sum("cycle2" in p for p in labelled["train"] + labelled["val"]) >= 1
    assert not any(set(L.state(n)["images"]) & set(L.state(m)["images"]) for n in (1, 2, 3) for m in (1, 2, 3) if n < m)

    # hand-edited nonsense: one line naming the file
    (lab / "current").write_text("latest\n")
    assert cycle("status", "--lab", str(lab)) == 2
    assert "current: 'latest' is not a version such as v2" in capsys.readouterr().err
    (lab / "current").write_text("v3\n")
    L.card_file(3).write_text("{not json")
    assert cycle("status", "--lab", str(lab)) == 2
    err = capsys.readouterr().err
    assert "v3.json: not valid JSON" in err and err.count("\n") == 1
