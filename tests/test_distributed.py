"""Scaling out on CPU: 2-process DDP (gloo) equals 1 process, DDP resume, SLURM environment, signals, bf16."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import fit_args

REPO = Path(__file__).resolve().parents[1]

SIGNALLER = textwrap.dedent(
    """
    import os, signal
    import lightning as L

    class SignalAt(L.Callback):
        '''Send a signal to this process at the first batch of an epoch (a cluster's preemption notice).'''

        def __init__(self, epoch: int = 1, sig: str = "SIGUSR1"):
            self.epoch, self.sig, self.sent = epoch, sig, False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == self.epoch and not self.sent:
                self.sent = True
                os.kill(os.getpid(), getattr(signal, self.sig))
    """
)


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": f"{cwd}{os.pathsep}{REPO}", **(env or {})}
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        if env is None or key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "cellseg_pl", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=900)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------- metric sync
def _score(rank: int, world: int, port: int, out: str) -> None:
    from cellseg_pl.metrics import CellMatchMetrics, mask_map_metric

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    images = []
    for i in range(5):  # 5 images: 3 on rank 0 and 2 on rank 1, as an unrepeated split gives
        size, n = 48, 3 + i
        gt = torch.zeros(n, size, size, dtype=torch.bool)
        pred = torch.zeros(n + 1, size, size, dtype=torch.bool)
        for k in range(n):
            y, x = 4 + 8 * (k % 5), 4 + 9 * (k // 5)
            gt[k, y : y + 6, x : x + 6] = True
            dy = int(torch.randint(-2, 3, (1,), generator=gen))
            pred[k, max(0, y + dy) : y + dy + 6, x : x + 6] = True
        pred[n, 40:46, 40:46] = True  # a false positive

        def boxes(m):
            out = []
            for mk in m:
                ys, xs = torch.nonzero(mk, as_tuple=True)
                out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            return torch.tensor(out, dtype=torch.float32)

        images.append((
            {"masks": pred, "boxes": boxes(pred), "scores": torch.rand(n + 1, generator=gen), "labels": torch.zeros(n + 1, dtype=torch.long)},
            {"masks": gt, "boxes": boxes(gt), "labels": torch.zeros(n, dtype=torch.long)},
        ))
    mine = images[rank::world]
    mean_ap, cells = mask_map_metric(), CellMatchMetrics(conf=0.3)
    mean_ap.update([p for p, _ in mine], [t for _, t in mine])
    cells.update([p for p, _ in mine], [t for _, t in mine])
    result = {k: float(v) for k, v in {**mean_ap.compute(), **cells.compute()}.items() if v.numel() == 1}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if world > 1:
        torch.distributed.destroy_process_group()


def test_metrics_reduce_across_processes_with_uneven_image_counts(tmp_path):
    _score(0, 1, 0, str(tmp_path / "one.json"))
    torch.multiprocessing.spawn(_score, args=(2, 29617, str(tmp_path / "two.json")), nprocs=2)
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert 0.2 < one["segm_map"] < 1 and 0 < one["precision"] < 1  # a non-trivial case
    assert one == two


# ----------------------------------------------------------------------------------------- DDP end to end
@pytest.mark.slow
@pytest.mark.parametrize("model", ["yolov8n-seg.yaml", "yolo26n-seg.yaml"])
def test_ddp_fit_resume_and_validate_match_single_process(tiny_data, tmp_path, model):
    """Also YOLO26-seg (Ultralytics #24536: its DDP training hangs before the first validation)."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.batch_size", "2", "--model.model", model]
    first = run_cli(fit_args(tiny_data, tmp_path, "ddp", 1, *ddp), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "ddp2").exists()  # both processes wrote to the same run folder
    resumed = run_cli(fit_args(tiny_data, tmp_path, "ddp", 2, *ddp, "--ckpt_path", "last"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in rows(tmp_path / "ddp" / "results.csv")] == ["1", "2"]
    ckpt = torch.load(tmp_path / "ddp" / "weights" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and int(ckpt["state_dict"]["ema.updates"]) > 0

    reports = {}
    for devices in ("1", "2"):
        report = tmp_path / f"val{devices}.json"
        args = ["validate", "--config", str(REPO / "configs" / "demo.yaml"), "--project", str(tmp_path),
                "--name", "ddp", "--data.dataset", str(tiny_data), "--data.imgsz", "128", "--data.batch_size", "2",
                "--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
                "--trainer.devices", devices, "--ckpt_path", str(tmp_path / "ddp" / "weights" / "last.ckpt"),
                "--report", str(report)]
        if devices == "2":
            args += ["--trainer.strategy", "ddp"]
        done = run_cli(args, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        reports[devices] = json.loads(report.read_text())
    metrics = {k for k in reports["1"] if k.startswith("metrics/") or k == "fitness"}
    assert "metrics/mAP50(M)" in metrics and "metrics/count_MAE" in metrics
    for key in metrics:
        assert reports["1"][key] == pytest.approx(reports["2"][key], abs=1e-6), key


# ----------------------------------------------------------------------------------------- SLURM
def slurm_env(ntasks: int, procid: int, localid: int, nodeid: int) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "cellseg", "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(ntasks // 2 or 1), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid), "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2",
    }


def test_fake_slurm_environment_gives_ranks_and_requeue(tiny_data, tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from cellseg_pl.train.cli import CellSegCLI

    for key, value in slurm_env(ntasks=4, procid=3, localid=1, nodeid=1).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PL_TORCH_DISTRIBUTED_BACKEND", "gloo")
    # the sbatch script's command, minus srun: 2 nodes x 2 devices
    args = fit_args(tiny_data, tmp_path, "job_4242", 1, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.num_nodes", "2", "--trainer.strategy", "ddp")
    (tmp_path / "job_4242").mkdir()
    (tmp_path / "job_4242" / "hpc_ckpt_1.ckpt").write_bytes(b"")  # as after a requeue signal
    cli = CellSegCLI(args=args[1:], run=False)  # run=False: no sub-command
    trainer = cli.trainer
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert env.main_address == "gpu01"
    assert cli.run_dir == tmp_path / "job_4242"  # a requeued job keeps its folder (no job_42422)
    assert trainer.default_root_dir == str(tmp_path / "job_4242")  # where Lightning looks for hpc_ckpt_*.ckpt


@pytest.mark.slow
def test_requeue_signal_saves_a_checkpoint_the_restarted_job_resumes(tiny_data, tmp_path):
    (tmp_path / "signaller.py").write_text(SIGNALLER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # SLURM's answer to "scontrol requeue": record it, then end the job the hard way
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/requeued\nkill -9 $PPID\n")
    scontrol.chmod(0o755)
    env = {**slurm_env(ntasks=1, procid=0, localid=0, nodeid=0), "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    args = fit_args(tiny_data, tmp_path, "job", 3)
    killed = run_cli([*args, "--trainer.callbacks+=signaller.SignalAt"], tmp_path, env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert list((tmp_path / "job").glob("hpc_ckpt_*.ckpt"))
    restarted = run_cli(args, tmp_path, env)  # the same command, as SLURM re-runs the batch script
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "Restored all states from the checkpoint" in restarted.stderr + restarted.stdout
    assert [r["epoch"] for r in rows(tmp_path / "job" / "results.csv")] == ["1", "2", "3"]
    assert not (tmp_path / "job2").exists()


@pytest.mark.slow
def test_sigterm_saves_last_and_fit_resumes(tiny_data, tmp_path):
    (tmp_path / "signaller.py").write_text(SIGNALLER)
    args = fit_args(tiny_data, tmp_path, "term", 3)
    stopped = run_cli([*args, "--trainer.callbacks+=signaller.SignalAt", "--trainer.callbacks.init_args.sig",
                       "SIGTERM"], tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "resume with --ckpt_path last" in stopped.stderr
    ckpt = torch.load(tmp_path / "term" / "weights" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # saved during epoch 2 (index 1), after the signal
    resumed = run_cli([*args, "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(tmp_path / "term" / "results.csv")[-1]["epoch"] == "3"


# ----------------------------------------------------------------------------------------- precision
@pytest.mark.slow
def test_bf16_mixed_on_cpu_trains_without_nan(tiny_data, tmp_path):
    from cellseg_pl.__main__ import main

    assert main(fit_args(tiny_data, tmp_path, "bf16", 2, "--trainer.precision", "bf16-mixed")) == 0
    last = rows(tmp_path / "bf16" / "results.csv")[-1]
    for key in ("train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss", "val/seg_loss"):
        assert float(last[key]) == float(last[key]) and abs(float(last[key])) < 1e4, key  # finite


def test_sbatch_script_runs_a_valid_fit_command(tiny_data, tmp_path, capsys):
    """Run scripts/slurm/train.sbatch with a fake srun and check the fit command it builds parses."""
    from cellseg_pl.__main__ import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/srun_args\n")
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")
    env = {**os.environ, **slurm_env(ntasks=8, procid=0, localid=0, nodeid=0), "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = REPO / "scripts" / "slurm" / "train.sbatch"
    text = script.read_text()
    for directive in ("--signal=SIGUSR1@90", "--requeue", "--ntasks-per-node", "--nodes"):
        assert f"#SBATCH {directive}" in text
    done = subprocess.run(["bash", str(script), str(REPO / "configs" / "demo.yaml"), "--data.dataset", str(tiny_data)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun_args").read_text().split("\n")[:-1]
    assert args[:4] == ["--kill-on-bad-exit=1", "python", "-m", "cellseg_pl"]
    fit = args[4:]
    assert fit[fit.index("--trainer.devices") + 1] == "4" and fit[fit.index("--trainer.num_nodes") + 1] == "2"
    assert fit[fit.index("--name") + 1] == "cellseg_4242"  # stable across requeues of the job
    fit[fit.index("--trainer.accelerator") + 1] = "cpu"  # no GPU here: parse the rest as is
    with pytest.raises(SystemExit) as exit_info:
        main([*fit, "--print_config"])
    assert exit_info.value.code == 0
    assert "num_nodes: 2" in capsys.readouterr().out
