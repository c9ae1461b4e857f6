"""Callbacks of every fit: the guide's weights/best.pt and last.pt, the console lines and the closing summary;
results.csv, close_mosaic, crash-safe last.ckpt; validate's console (metrics once, no fit-only warnings)."""

from __future__ import annotations

import csv
import logging
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cellseg_pl.__main__ import main
from cellseg_pl.train.callbacks import (
    RESULTS_COLUMNS,
    CloseMosaic,
    ConsoleReport,
    FitnessEarlyStopping,
    ResultsCSV,
    RunCheckpoint,
    UltralyticsWeights,
)

from conftest import fit_args


@pytest.mark.slow
def test_fit_writes_ultralytics_weights_and_a_readable_console(tiny_data, tmp_path, capsys):
    assert main(fit_args(tiny_data, tmp_path, "run", 2)) == 0
    err = capsys.readouterr().err
    run = tmp_path / "run"
    weights = run / "weights"
    assert (weights / "best.pt").is_file() and (weights / "last.pt").is_file()
    assert not list(weights.glob(".*.partial-*"))
    # one line per validated epoch, 1-based, with the losses and the mask metrics
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all(re.search(r"box [\d.]+ seg [\d.]+ cls [\d.]+ dfl [\d.]+ .*mAP50-95 [\d.]+ F1 [\d.]+", x) for x in lines)
    # the closing lines: best epoch, the run folder and what is in it
    assert re.search(r"best epoch [12] \(fitness [\d.]+\): mask P", err)
    summary = next(line for line in err.splitlines() if line.startswith("results saved to"))
    assert str(run) in summary and "weights/best.pt" in summary and "results.csv" in summary
    # no cellseg_pl log line is printed twice
    ours = [line for line in err.splitlines() if line.startswith(("epoch ", "best epoch", "results saved"))]
    assert len(ours) == len(set(ours))

    # the guide's step 5, `yolo segment val model=.../weights/best.pt`, on the run's own best.pt
    from ultralytics import YOLO

    model = YOLO(str(weights / "best.pt"))
    assert model.task == "segment" and model.names == {0: "cell"}
    assert model.overrides.get("data") == str(tiny_data.resolve())  # data= comes from the file's train_args
    metrics = model.val(data=str(tiny_data), imgsz=128, batch=4, device="cpu", plots=False, verbose=False,
                        project=str(tmp_path / "val"), name="v")
    assert 0.0 <= metrics.seg.map50 <= 1.0


def test_progress_bar_counts_epochs_from_one_and_log_lines_stay_off_it(tiny_data, tmp_path, capsys):
    args = [a if a != "false" or prev != "--trainer.enable_progress_bar" else "true"
            for prev, a in zip([None, *fit_args(tiny_data, tmp_path, "bar", 1)], fit_args(tiny_data, tmp_path, "bar", 1))]
    assert main(args) == 0
    captured = capsys.readouterr()
    err = captured.err
    bars = captured.out + captured.err  # (Lightning draws its bars on stdout)
    assert "Epoch 1/1" in bars and "Epoch 0" not in bars
    # our log lines start on a line of their own (written through tqdm), never glued to a bar
    assert re.search(r"^epoch 1/1 ", err, re.MULTILINE)


# ---------------------------------------------------------------------------------------------- unit tests

def fake_trainer(epoch: int = 0, metrics: dict | None = None, **kw) -> SimpleNamespace:
    """What the callbacks read from a ``Trainer``."""
    return SimpleNamespace(current_epoch=epoch, max_epochs=kw.pop("max_epochs", 3), is_global_zero=True,
                           sanity_checking=False, callback_metrics=metrics or {}, **kw)  # fmt: skip


def epoch_metrics(fitness: float) -> dict:
    return {"train/box_loss": torch.tensor(1.25), "train/seg_loss": torch.tensor(2.5), "train/cls_loss": 0.5,
            "train/dfl_loss": torch.tensor(1.0), "metrics/mAP50(M)": torch.tensor(0.6),
            "metrics/mAP50-95(M)": torch.tensor(0.4), "metrics/precision(M)": 0.7, "metrics/recall(M)": 0.65,
            "metrics/F1(M)": 0.675, "fitness": torch.tensor(fitness), "lr/pg0": 0.001,
            "loss": torch.tensor(9.0),  # (no "/": the progress bar's, not a results.csv column)
            "metrics/nan": float("nan"), "metrics/vector": torch.ones(3)}  # fmt: skip


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_results_csv_columns_epochs_and_resume(tmp_path):
    path = tmp_path / "run" / "results.csv"
    cb = ResultsCSV(path)
    for epoch in (0, 1):
        trainer = fake_trainer(epoch, epoch_metrics(0.3 + epoch))
        cb.on_train_epoch_start(trainer, None)
        cb.on_train_epoch_end(trainer, None)
    columns, rows = read_csv(path)
    # Ultralytics' columns in its order, then our extra metrics sorted; non-finite, vector and bare keys left out
    present = ["epoch", "time", "train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss",
               "metrics/precision(M)", "metrics/recall(M)", "metrics/mAP50(M)", "metrics/mAP50-95(M)", "lr/pg0"]
    assert columns == present + ["fitness", "metrics/F1(M)"]
    assert [c for c in RESULTS_COLUMNS if c in present] == present
    assert [r["epoch"] for r in rows] == ["1", "2"]  # 1-based
    assert [r["fitness"] for r in rows] == ["0.3", "1.3"] and rows[0]["train/box_loss"] == "1.25"
    assert 0 <= float(rows[0]["time"]) <= float(rows[1]["time"])
    assert not list(path.parent.glob("*.tmp"))
    # resume at epoch 2 (0-based 1): its row is replaced, earlier rows kept, training time continues
    resumed = ResultsCSV(path)
    resumed.load_state_dict({"elapsed": 100.0})
    trainer = fake_trainer(1, {"fitness": torch.tensor(0.9), "metrics/extra": 1.0})
    resumed.on_train_epoch_start(trainer, None)
    resumed.on_train_epoch_end(trainer, None)
    columns, rows = read_csv(path)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["fitness"] == "0.9" and rows[0]["fitness"] == "0.3"
    assert "metrics/extra" in columns and float(rows[1]["time"]) >= 100.0
    assert resumed.state_dict()["elapsed"] >= 100.0
    # other ranks and the sanity check write nothing
    before = path.read_text()
    other = fake_trainer(2, epoch_metrics(0.5))
    other.is_global_zero = False
    sanity = fake_trainer(2, epoch_metrics(0.5))
    sanity.sanity_checking = True
    for trainer in (other, sanity):
        resumed.on_train_epoch_end(trainer, None)
    assert path.read_text() == before


def test_close_mosaic_tells_the_datamodule_the_epoch():
    calls = []
    datamodule = SimpleNamespace(set_epoch=lambda epoch, max_epochs: calls.append((epoch, max_epochs)))
    CloseMosaic().on_train_epoch_start(fake_trainer(4, max_epochs=10, datamodule=datamodule), None)
    CloseMosaic().on_train_epoch_start(fake_trainer(5, max_epochs=None, datamodule=datamodule), None)
    CloseMosaic().on_train_epoch_start(fake_trainer(5, datamodule=None), None)  # no data module: nothing to do
    assert calls == [(4, 10), (5, -1)]


def test_early_stopping_waits_while_nothing_is_found_yet_as_ultralytics():
    from ultralytics.utils.torch_utils import EarlyStopping as UltralyticsEarlyStopping

    # a run from scratch: fitness 0 for 25 epochs, then it learns, then it plateaus
    fitness = [0.0] * 25 + [0.1, 0.3, 0.5, 0.5] + [0.4] * 30
    ours = FitnessEarlyStopping(monitor="fitness", mode="max", patience=20)
    theirs = UltralyticsEarlyStopping(patience=20)
    stops = []
    for epoch, f in enumerate(fitness, start=1):
        ours_stop, _ = ours._evaluate_stopping_criteria(torch.tensor(f))
        stops.append((ours_stop, theirs(epoch, f)))
    assert [s for s, _ in stops] == [t for _, t in stops]  # the same epochs, epoch by epoch
    assert [s for s, _ in stops].index(True) + 1 == 48  # 20 epochs after the best (epoch 28), not at epoch 21
    assert float(ours.best_score) == 0.5
    plain = FitnessEarlyStopping(monitor="fitness", mode="min", patience=2)  # other modes: Lightning's own rule
    assert [plain._evaluate_stopping_criteria(torch.tensor(v))[0] for v in (0.0, 0.0, 0.0)] == [False, False, True]


def test_early_stopping_counts_only_epochs_in_which_the_optimizer_stepped():
    from types import SimpleNamespace

    def run(stopper, steps, fitness):
        """The epoch (1-based) at which ``stopper`` stops a run with these per-epoch last steps and fitness."""
        for epoch, (step, f) in enumerate(zip(steps, fitness), start=1):
            trainer = SimpleNamespace(
                fast_dev_run=False, callback_metrics={"fitness": torch.tensor(f)}, should_stop=False,
                current_epoch=epoch - 1, strategy=SimpleNamespace(reduce_boolean_decision=lambda x, all: x),
                lightning_module=SimpleNamespace(recipe=SimpleNamespace(last_opt_step=step)),
            )  # fmt: skip
            stopper._run_early_stopping_check(trainer)
            if trainer.should_stop:
                return epoch
        return None

    # 5 batches an epoch, a step every 16 batches: the weights change in 1 epoch of 3 (or 4)
    steps = [b // 16 * 16 - 1 for b in range(5, 5 * 61, 5)]
    # each new set of weights is validated alike until the next step; the best is at the 3rd step, then it drifts
    per_step = {s: f for s, f in zip(sorted(set(steps)), [0.1, 0.2, 0.5] + [0.3] * 40)}
    fitness = [per_step[s] for s in steps]
    ours = FitnessEarlyStopping(monitor="fitness", mode="max", patience=4)
    stopped = run(ours, steps, fitness)
    changes = [e for e in range(1, len(steps)) if steps[e] != steps[e - 1]]  # 0-based epochs with new weights
    best_epoch = changes[1] + 1  # 1-based epoch that first validated the best weights
    assert stopped == changes[changes.index(best_epoch - 1) + 4] + 1  # 4 epochs with new weights after the best
    assert run(FitnessEarlyStopping(monitor="fitness", mode="max", patience=4), [None] * 60, fitness) == best_epoch + 4
    state = ours.state_dict()  # resume keeps which weights were last checked
    again = FitnessEarlyStopping(monitor="fitness", mode="max", patience=4)
    again.load_state_dict(state)
    assert again.last_step_seen == ours.last_step_seen == steps[stopped - 1]


def test_console_report_lines_best_epoch_and_summary(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    for name in ("weights/best.pt", "weights/last.ckpt", "weights/.last.ckpt.partial-1", "results.csv"):
        (run / name).write_text("x")
    cb = ConsoleReport(run)
    caplog.set_level(logging.INFO, logger="cellseg_pl.train.callbacks")
    cb.on_fit_start(fake_trainer(), None)
    cb.on_train_epoch_end(fake_trainer(0, epoch_metrics(0.5), max_epochs=40), None)
    cb.on_train_epoch_end(fake_trainer(1, {"train/box_loss": 1.0}, max_epochs=40), None)  # not validated: no line
    cb.on_train_epoch_end(fake_trainer(2, epoch_metrics(0.25), max_epochs=40), None)
    cb.on_fit_end(fake_trainer(3), None)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("epoch 1/40  box 1.250 seg 2.500 cls 0.500 dfl 1.000  |  "
                        "mask P 0.700 R 0.650 mAP50 0.600 mAP50-95 0.400 F1 0.675")  # fmt: skip
    assert lines[1].startswith("epoch 3/40  ")
    assert lines[2].endswith("epoch(s) completed in 0.0 min") and lines[2].startswith("3 ")
    assert lines[3] == "best epoch 1 (fitness 0.5000): mask P 0.700 R 0.650 mAP50 0.600 mAP50-95 0.400 F1 0.675"
    assert lines[4] == f"results saved to {run}: weights/best.pt, weights/last.ckpt, results.csv"
    assert len(lines) == 5
    # the best epoch survives a resume
    resumed = ConsoleReport(run)
    resumed.load_state_dict(cb.state_dict())
    resumed.on_train_epoch_end(fake_trainer(3, epoch_metrics(0.4), max_epochs=40), None)
    assert resumed.state_dict()["best"][1] == 1


def test_ultralytics_weights_follow_best_ckpt(tmp_path, monkeypatch):
    saved = []
    cb = UltralyticsWeights(tmp_path / "weights", {"data": "d.yaml"})
    monkeypatch.setattr(cb, "_save", lambda module, name, epoch: saved.append((name, epoch)))
    ckpt = SimpleNamespace(best_model_path="", best_model_score=None)
    for epoch, path, score in [(0, "", None), (1, "best.ckpt", torch.tensor(0.2)), (2, "best.ckpt", torch.tensor(0.2)),
                               (3, "best.ckpt", torch.tensor(0.3))]:  # fmt: skip
        ckpt.best_model_path, ckpt.best_model_score = path, score
        cb.on_train_epoch_start(fake_trainer(epoch, checkpoint_callback=ckpt), None)
    assert saved == [("best.pt", 1), ("best.pt", 3)]  # only when best.ckpt was rewritten
    cb.on_fit_end(fake_trainer(4, checkpoint_callback=ckpt), None)
    assert saved[-1] == ("last.pt", 4) and len(saved) == 3
    state = cb.state_dict()
    assert state == {"best_path": "best.ckpt", "best_score": pytest.approx(0.3)}
    again = UltralyticsWeights(tmp_path / "weights")
    again.load_state_dict(state)
    monkeypatch.setattr(again, "_save", lambda module, name, epoch: saved.append((name, epoch)))
    again.on_train_epoch_start(fake_trainer(5, checkpoint_callback=ckpt), None)
    assert len(saved) == 3  # a resumed run does not rewrite an unchanged best.pt


def test_ultralytics_weights_write_a_file_ultralytics_loads(tmp_path):
    from ultralytics import YOLO

    from cellseg_pl.yolo.network import build_network

    net = build_network("yolov8n-seg.yaml", 1, {0: "cell"})
    module = SimpleNamespace(eval_net=net, class_names={0: "cell"})
    cb = UltralyticsWeights(tmp_path / "weights", {"imgsz": 128})
    cb._save(module, "last.pt", 7)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == ["last.pt"]  # no temporary file left
    model = YOLO(str(tmp_path / "weights" / "last.pt"))
    assert model.task == "segment" and model.names == {0: "cell"}
    assert model.ckpt["train_args"]["epochs_trained"] == 7 and model.ckpt["train_args"]["imgsz"] == 128


def no_step_module():
    """A Lightning module whose epochs end without an optimizer step (as with a long gradient accumulation)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    class NoStep(BoringModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.fail_at_epoch: int | None = None
            self.interrupt = False

        def training_step(self, batch, batch_idx):
            if self.current_epoch == self.fail_at_epoch:
                raise KeyboardInterrupt if self.interrupt else RuntimeError("loss is NaN")
            self.manual_backward(self(batch).sum())  # gradients accumulate; no step

    return NoStep()


def fit_no_step(tmp_path: Path, epochs: int, module=None):
    import lightning as L

    seen = []

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            last = tmp_path / "last.ckpt"
            seen.append(torch.load(last, weights_only=False)["epoch"] if last.exists() else None)

    module = module or no_step_module()
    cb = RunCheckpoint(dirpath=str(tmp_path), filename="best", save_last=True, save_top_k=0,
                       save_on_exception=True)  # fmt: skip
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, callbacks=[cb, Watch()],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    try:
        trainer.fit(module)
    except BaseException as e:  # noqa: BLE001
        seen.append(type(e).__name__)
    return seen


def test_run_checkpoint_writes_last_every_epoch_atomically(tmp_path):
    seen = fit_no_step(tmp_path, 3)
    assert seen == [None, 0, 1]  # last.ckpt of the previous epoch at every epoch start, though no step happened
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .partial-* left


def test_run_checkpoint_links_last_to_a_best_of_the_same_state(tmp_path):
    """A new best epoch writes its state once: ``last`` is a hard link to ``best``; the next epoch's ``last``
    replaces the link by renaming, and ``best`` keeps its epoch."""
    import os

    import lightning as L

    scores = [1.0, 2.0, 0.5]  # epochs 1 and 2 are new bests (epoch 1 records no last path yet), epoch 3 is not
    seen = []
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Scored(BoringModel):
        def on_train_epoch_end(self):
            self.log("score", scores[self.current_epoch])

    module = Scored()

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch:
                seen.append(os.path.samefile(tmp_path / "last.ckpt", tmp_path / "best.ckpt"))

    cb = RunCheckpoint(dirpath=str(tmp_path), filename="best", monitor="score", mode="max", save_last=True,
                       save_top_k=1, enable_version_counter=False)  # fmt: skip
    trainer = L.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[cb, Watch()],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")  # fmt: skip
    trainer.fit(module)
    assert seen == [False, True]
    assert not os.path.samefile(tmp_path / "last.ckpt", tmp_path / "best.ckpt")
    last, best = (torch.load(tmp_path / f"{n}.ckpt", weights_only=False) for n in ("last", "best"))
    assert (last["epoch"], best["epoch"]) == (2, 1)
    state = next(v for k, v in last["callbacks"].items() if "RunCheckpoint" in k)
    assert state["last_model_path"] == str(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize("interrupt", [True, False])
def test_run_checkpoint_on_an_interruption_or_a_failure(tmp_path, interrupt):
    module = no_step_module()
    module.fail_at_epoch, module.interrupt = 1, interrupt
    seen = fit_no_step(tmp_path, 3, module)
    assert seen[:2] == [None, 0]
    epoch = torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"]
    # Ctrl-C / SIGTERM: refreshed with the interrupted epoch's state; any other error keeps the last good one
    assert epoch == (1 if interrupt else 0)


# ---------------------------------------------------------------------------------------------- validate


@pytest.fixture(scope="module")
def one_epoch_ckpt(tiny_data, tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("runs")
    assert main(fit_args(tiny_data, project, "fit", 1)) == 0
    return project / "fit" / "weights" / "last.ckpt"


def test_validate_prints_the_metrics_once_without_lightning_warnings(one_epoch_ckpt, tiny_data, tmp_path, capsys):
    args = ["validate", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
            "--project", str(tmp_path), "--name", "elsewhere",  # not the run the checkpoint came from
            "--data.dataset", str(tiny_data), "--data.imgsz", "128", "--data.batch_size", "4",
            "--data.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--ckpt_path", str(one_epoch_ckpt)]  # fmt: skip
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    out, err = capsys.readouterr()
    messages = [str(w.message) for w in caught] + err.splitlines()
    assert not [m for m in messages if "callbacks used to create the checkpoint" in m], messages
    assert not [m for m in messages if "dirpath has changed" in m], messages
    assert out.count("validation (") == 1 and out.count("mask mAP50-95") == 1
    assert "Validate metric" not in out + err  # Lightning's own table
    assert not (tmp_path / "elsewhere").exists()  # validate writes no run folder


def test_file_checkpoint_io_writes_the_checkpoint_straight_into_its_file(tmp_path, monkeypatch):
    """The checkpoint written into its file (no in-memory copy through fsspec) loads back as it was; remote paths
    keep Lightning's writer."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    from cellseg_pl.train.callbacks import FileCheckpointIO

    calls = []
    monkeypatch.setattr(torch_io, "_atomic_save", lambda *a, **k: calls.append(a[1]))
    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 4, "note": "x"}
    path = tmp_path / "sub" / "last.ckpt"
    FileCheckpointIO().save_checkpoint(state, path)
    back = torch.load(path, weights_only=False)
    assert back["epoch"] == 4 and back["note"] == "x" and torch.equal(back["state_dict"]["w"], state["state_dict"]["w"])
    assert calls == []  # not through Lightning's in-memory writer
    FileCheckpointIO().save_checkpoint(state, "memory://bucket/last.ckpt")
    assert calls == ["memory://bucket/last.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        FileCheckpointIO().save_checkpoint(state, path, storage_options={"a": 1})
