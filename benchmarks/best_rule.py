"""Which validation rule picks the ``best`` weights a lab should deploy? Measured on the real-cells benchmark's data.

    python -m benchmarks.best_rule --preset small [--seeds 0 1 2 3 4] [--out checkpoints/study_best_rule]
    python -m benchmarks.best_rule --preset standard --seeds 0 1 2

For each seed, cellseg_pl trains once on ``real_cells.py``'s data with that preset, without early stopping,
and keeps every epoch's weights (the EMA, float32). Training is deterministic and does not depend on the rule, so
one run serves every rule: for each rule, the epoch it would pick with the preset's patience (cellseg_pl's early
stopping: Ultralytics' with its zero-fitness start, counting only epochs with an optimizer step) is read off the
run's ``results.csv`` (validation split), and those weights
(and the epoch the run would have stopped at, ``last``) are scored on the test split by the benchmark's one
evaluator. ``--test-every N`` also scores every N-th epoch, the test curve the rules try to follow.

Rules (validation metrics of ``results.csv``; masks compared at full resolution, COCO):

* ``mask 0.1/0.9``: 0.1 mask mAP50 + 0.9 mask mAP50-95 (cellseg_pl's rule until this study; Ultralytics 8.0-8.3 on
  masks);
* ``box+mask mAP50-95``: box mAP50-95 + mask mAP50-95 (Ultralytics 8.4's rule, with our evaluator);
* ``mask mAP50-95``;
* ``F1``: F1 at IoU 0.5 and conf 0.25 (``--model.pr_conf``);
* ``F1 + mask mAP50-95``.

Prints, per rule, mean ± std over seeds of the picked epoch's test F1 @ 0.25, best F1, mask mAP50-95, and the epoch;
writes ``study.json``. Not part of CI; the data's licence is ``real_cells.py``'s (never commit it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks import common
from benchmarks import real_cells as bench

#: Rule name -> its score from one ``results.csv`` row (floats).
RULES = {
    "mask 0.1/0.9": lambda r: 0.1 * r["metrics/mAP50(M)"] + 0.9 * r["metrics/mAP50-95(M)"],
    "box+mask mAP50-95": lambda r: r["metrics/mAP50-95(B)"] + r["metrics/mAP50-95(M)"],
    "mask mAP50-95": lambda r: r["metrics/mAP50-95(M)"],
    "F1": lambda r: r["metrics/F1(M)"],
    "F1 + mask mAP50-95": lambda r: r["metrics/F1(M)"] + r["metrics/mAP50-95(M)"],
}
SCORED = (("F1@0.5", "F1 @ 0.25"), ("best_F1", "best F1"), ("mAP50-95(M)", "mask mAP50-95"))


def pick(scores: list[float], patience: int | None, stepped: list[bool] | None = None) -> tuple[int, int]:
    """``(best epoch, last epoch)`` (1-based) of a run whose per-epoch scores are ``scores``.

    Best: the first epoch of the highest score so far (a later one must be strictly higher, as ``best.ckpt``).
    Stop: cellseg_pl's early stopping (``FitnessEarlyStopping``): Ultralytics' rule (an epoch whose score is higher,
    or any epoch while the best is still 0, restarts the count; the run stops ``patience`` counted epochs after the
    last restart), counting only the epochs in which the optimizer stepped (``stepped``; all when ``None``: then it
    is Ultralytics' rule exactly); ``patience`` ``None``: never.
    """
    stepped = stepped or [True] * len(scores)
    best_epoch, best = 1, scores[0]
    restart_best, waited = scores[0], 0
    for epoch, (score, step) in enumerate(zip(scores, stepped), start=1):
        if score > best:
            best, best_epoch = score, epoch
        if epoch == 1 or not step:
            continue  # (the first epoch sets the mark; an epoch without a step validates the same weights again)
        if score > restart_best or restart_best == 0:
            restart_best, waited = score, 0
        else:
            waited += 1
        if patience is not None and waited >= patience:
            return best_epoch, epoch
    return best_epoch, len(scores)


def stepped_epochs(rows: list[dict[str, float]]) -> list[bool]:
    """Whether the optimizer stepped in each epoch of ``results.csv``: without a step the same weights are validated
    again, and every validation loss and metric repeats the previous epoch's to the last digit."""
    def validation(row: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in row.items() if k.startswith(("val/", "metrics/"))}

    return [i == 0 or validation(r) != validation(rows[i - 1]) for i, r in enumerate(rows)]


def read_results(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def train(a: argparse.Namespace, seed: int, data: Path, out: Path) -> Path:
    """Train cellseg_pl once (no early stopping), every epoch's EMA saved as ``epochs/epoch{N}.pt``; in a worker."""
    cmd = [sys.executable, "-m", "benchmarks.best_rule", "--only", "cellseg_pl", "--dataset-yaml", str(data), "--run-out", str(out),
           "--seeds", str(seed), "--preset", a.preset, "--epochs", str(a.epochs), "--imgsz", str(a.imgsz),
           "--batch", str(a.batch), "--nbs", str(a.nbs), "--close-mosaic", str(a.close_mosaic)]
    cmd += [f"--cellseg-args={shlex.join(a.cellseg_args)}"] if a.cellseg_args else []
    out.mkdir(parents=True, exist_ok=True)
    done = common.spawn(cmd, out / "train.log")
    if done["returncode"] != 0:
        raise SystemExit(f"seed {seed}: training failed (exit {done['returncode']}); see {out / 'train.log'}")
    print(f"seed {seed}: trained in {done['wall_s']:.0f} s", flush=True)
    return out / "cellseg_pl"


def train_worker(a: argparse.Namespace) -> int:
    import lightning as L

    from cellseg_pl.yolo.network import save_ultralytics_checkpoint

    class EpochWeights(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            folder = Path(trainer.default_root_dir) / "epochs"
            folder.mkdir(exist_ok=True)
            save_ultralytics_checkpoint(pl_module.eval_net, folder / f"epoch{trainer.current_epoch + 1}.pt",
                                        pl_module.class_names, {"imgsz": a.imgsz}, half=False)

    knobs = argparse.Namespace(data=a.dataset_yaml, model=a.model, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch,
                               nbs=a.nbs, workers=a.workers, device=a.device, precision=a.precision,
                               seed=a.seeds[0], close_mosaic=a.close_mosaic, patience=a.epochs)
    common.run_cellseg(knobs, Path(a.run_out).resolve(), extra_args=tuple(a.cellseg_args),
                             callbacks=(EpochWeights(),))
    return 0


def score(run: Path, epoch: int, data: Path, imgsz: int, cache: dict) -> dict:
    if epoch not in cache:
        result = bench.score_run(str(run / "epochs" / f"epoch{epoch}.pt"), data, imgsz)
        cache[epoch] = {k: result[k] for k, _ in SCORED}
    return cache[epoch]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--test-every", type=int, default=0, help="also score every N-th epoch on the test split")
    p.add_argument("--out", default=str(bench.REPO / "checkpoints" / "study_best_rule"), help="output folder")
    own, rest = p.parse_known_args(argv)
    a = bench.parse(rest)
    if a.only:
        return train_worker(a)
    out = Path(own.out).expanduser().resolve()
    common.prepare_out(out, __file__, ("data", "runs", "study.json"))
    data, _ = bench.build_hela(a, out / "data")
    picks: dict[str, list[dict]] = {name: [] for name in (*RULES, *(f"{r} (last)" for r in RULES))}
    curves = {}
    for seed in a.seeds:
        run = train(a, seed, data, out / "runs" / f"seed{seed}")
        rows = read_results(run / "results.csv")
        cache: dict[int, dict] = {}
        for name, rule in RULES.items():
            best, last = pick([rule(r) for r in rows], a.patience, stepped_epochs(rows))
            for key, epoch in ((name, best), (f"{name} (last)", last)):
                picks[key].append({"seed": seed, "epoch": epoch, **score(run, epoch, data, a.imgsz, cache)})
            print(f"seed {seed} {name}: best epoch {best} -> test F1 {cache[best]['F1@0.5']:.3f}, best F1 "
                  f"{cache[best]['best_F1']:.3f}, mAP50-95 {cache[best]['mAP50-95(M)']:.3f}; stops at {last}",
                  flush=True)
        if own.test_every:
            for epoch in range(own.test_every, len(rows) + 1, own.test_every):
                score(run, epoch, data, a.imgsz, cache)
        curves[seed] = {e: cache[e] for e in sorted(cache)}
        (out / "study.json").write_text(json.dumps({"config": vars(a), "picks": picks, "curves": curves}, indent=2,
                                                   default=str))
    print(f"\n### Rules, {a.preset} preset, seeds {' '.join(map(str, a.seeds))}: test split at the picked epoch "
          f"(mean ± std)\n")
    print("| rule | epoch | " + " | ".join(label for _, label in SCORED) + " |")
    print("|---" * (len(SCORED) + 2) + "|")
    for name, rows in picks.items():
        cells = [bench.fmt(*bench.mean_std([float(r[k]) for r in rows])) for k, _ in SCORED]
        epochs = bench.mean_std([float(r["epoch"]) for r in rows])
        print(f"| {name} | {epochs[0]:.0f} ± {epochs[1]:.0f} | " + " | ".join(cells) + " |")
    if own.test_every:
        print("\nTest curve (mean over seeds): " + ", ".join(
            f"{e}: F1 {statistics.fmean(curves[s][e]['F1@0.5'] for s in curves):.3f} / mAP50-95 "
            f"{statistics.fmean(curves[s][e]['mAP50-95(M)'] for s in curves):.3f}"
            for e in sorted({e for c in curves.values() for e in c}) if all(e in curves[s] for s in curves)))
    print(f"\nwrote {out / 'study.json'}")
    return 0 if not any(math.isnan(float(r["F1@0.5"])) for rows in picks.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
