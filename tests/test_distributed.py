"""Who a process is under torchrun, under srun (SLURM variables, simulated), or alone."""
from __future__ import annotations

import pytest
import torch

from mfcore.training import distributed as du

SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
        "SLURM_JOB_NODELIST": "node[01-02]"}


def test_single_process_without_launcher_variables():
    assert du.launch_env({}) == {"launcher": None, "rank": 0, "local_rank": 0, "world_size": 1}


def test_srun_variables_give_rank_local_rank_and_world_size():
    assert du.launch_env(SRUN) == {"launcher": "slurm", "rank": 5, "local_rank": 1, "world_size": 8}
    assert du.launch_env({**SRUN, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})["world_size"] == 1


def test_the_batch_script_itself_is_one_process():
    # sbatch runs its script with SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no job step
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert du.launch_env({**batch, "SLURM_PROCID": "0"})["world_size"] == 1


def test_torchrun_variables_win_over_slurm():
    env = {**SRUN, "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1"}  # torchrun started by srun, per node
    assert du.launch_env(env) == {"launcher": "torchrun", "rank": 9, "local_rank": 1, "world_size": 16}


@pytest.mark.parametrize("env, expected", [
    ({**SRUN, "SLURM_NTASKS": "zero"}, "SLURM_NTASKS='zero'"), ({**SRUN, "SLURM_PROCID": "8"}, "not below"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"), ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1'")])
def test_bad_launcher_variables_are_named(env, expected):
    with pytest.raises(ValueError, match=expected):
        du.launch_env(env)


def _unset(monkeypatch, *names: str) -> None:
    """Remove `names` from the environment and restore them (or their absence) after the test, including
    what init_distributed sets."""
    for name in names:
        monkeypatch.setenv(name, "recorded")  # records the previous state, absent or not
        monkeypatch.delenv(name)


def test_srun_without_master_address_is_refused_with_the_export_line(monkeypatch):
    _unset(monkeypatch, "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    assert du.env_world_size() == 8
    with pytest.raises(ValueError, match="MASTER_ADDR.*scontrol show hostnames"):
        du.init_distributed(torch.device("cpu"))


def test_srun_sets_torch_variables_before_joining(monkeypatch):
    calls = []
    _unset(monkeypatch, "WORLD_SIZE", "RANK", "LOCAL_RANK")
    for name, value in {**SRUN, "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(du.dist, "init_process_group", lambda backend, init_method: calls.append(
        (backend, init_method, {k: du.os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")})))
    assert du.init_distributed(torch.device("cpu")) == torch.device("cpu")
    assert calls == [("gloo", "env://", {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})]
