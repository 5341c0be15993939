"""Real multi-process training on loopback: ZeRO 1-3 on 2 ranks equals 1 process; two "nodes", 2 launchers."""

import subprocess
import sys
from pathlib import Path

import pytest
from dist_helpers import (
    BASE_CONFIG,
    REPO,
    child_env,
    deepspeed_launcher,
    finish,
    free_port,
    losses,
    set_args,
    single,
    tiny,
    torchrun,
)

from megagpt.config import ConfigError, load_config
from megagpt.train import train

pytestmark = pytest.mark.distributed
GLOBAL_BATCH = 4 * 32 * 2  # micro batch × block × 2: accum 2 on one process, 1 on two


@pytest.fixture(scope="module")
def one_process(shakespeare_dataset, tmp_path_factory):
    """The reference: one process, gradient accumulation 2, ZeRO 0."""
    run_dir = tmp_path_factory.mktemp("dist") / "single"
    finish(single(run_dir, tiny(shakespeare_dataset, global_batch_tokens=GLOBAL_BATCH)))
    return losses(run_dir)


@pytest.fixture
def extensions(tmp_path, monkeypatch) -> Path:
    """Where DeepSpeed would build its C++ ops, for the launches that follow."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    return tmp_path / "torch_extensions"


def assert_matches_one_process(run_dir: Path, one_process: dict, extensions: Path, *launchers) -> None:
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 9))
    for step, loss in one_process.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000008"
    # the CPU process group comes up without compiling DeepSpeed's inference-only shared-memory all-reduce
    assert not list(extensions.rglob("deepspeed_shm_comm*")), "deepspeed_shm_comm was built"
    for launcher in launchers:  # DeepSpeed's deprecated collectives: not the user's
        assert "FutureWarning" not in launcher.log_path.read_text(), launcher.log_path


# Each ZeRO stage once and each way of starting 2 ranks once: stage 3 under one torchrun agent with 2 workers,
# stage 2 under two torchrun agents ("nodes"), stage 1 under the DeepSpeed launcher. How the ranks were started
# does not reach the stage's sharding (2 gloo ranks on loopback either way), so the whole 3 x 3 grid would repeat
# the same equality in 6 more runs of 8-20 s of CI each.
def test_two_ranks_under_torchrun_match_one_process(zero3_two_ranks, one_process):
    """ZeRO 3, both workers under one torchrun agent: conftest's run, which test_export exports too."""
    run = zero3_two_ranks
    assert load_config(run.dir / "config.yaml").train.global_batch_tokens == GLOBAL_BATCH
    assert_matches_one_process(run.dir, one_process, run.extensions, run.launcher)


def test_two_nodes_under_torchrun_train_and_checkpoint(one_process, shakespeare_dataset, tmp_path, extensions):
    """Two torchrun agents (NNODES=2, NODE_RANK 0 and 1, one worker each) rendezvous on 127.0.0.1."""
    run_dir, port = tmp_path / "run", free_port()
    overrides = tiny(shakespeare_dataset, global_batch_tokens=GLOBAL_BATCH, zero_stage=2)
    nodes = [torchrun(run_dir, overrides, 1, port=port, nnodes=2, node_rank=rank) for rank in (0, 1)]
    finish(*nodes)
    assert_matches_one_process(run_dir, one_process, extensions, *nodes)
    manifest = (run_dir / "checkpoints" / "step_000008" / "megagpt_manifest.json").read_text()
    assert '"world_size": 2' in manifest


def test_two_nodes_under_the_deepspeed_launcher_without_ssh(one_process, shakespeare_dataset, tmp_path, extensions):
    """launch/deepspeed.sh per node (--no_ssh --node_rank): two distinct host names, one slot each."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    run_dir, port = tmp_path / "run", free_port()
    overrides = tiny(shakespeare_dataset, global_batch_tokens=GLOBAL_BATCH, zero_stage=1)
    nodes = [deepspeed_launcher(run_dir, overrides, hostfile, rank, port) for rank in (0, 1)]
    finish(*nodes)
    assert_matches_one_process(run_dir, one_process, extensions, *nodes)


def test_a_global_batch_that_does_not_divide_is_a_clear_error(shakespeare_dataset, tmp_path):
    cfg = load_config(None, tiny(shakespeare_dataset, global_batch_tokens=GLOBAL_BATCH + 32))
    with pytest.raises(ConfigError, match=r"train.global_batch_tokens=288 is not a multiple of .* = 128"):
        train(cfg, tmp_path / "run")


def test_a_config_error_under_torchrun_sh_is_one_line_before_any_rank_starts(shakespeare_dataset, tmp_path):
    # checked for the job's 2 ranks before torchrun starts: no rank, no torchrun failure summary, no run dir
    launcher = torchrun(tmp_path / "run", tiny(shakespeare_dataset, global_batch_tokens=GLOBAL_BATCH + 32), 2)
    (code,) = finish(launcher, timeout=120, ok=False)
    log = launcher.log_path.read_text()
    assert code == 2 and log.count("\n") == 1, log[-3000:]
    assert log.startswith("megagpt train: error: train.global_batch_tokens=288 is not a multiple of micro_batch_size "
                          "× block_size × world_size = 4 × 32 × 2 = 256")
    assert not (tmp_path / "run").exists()


def test_a_workers_error_under_torchrun_sh_ends_in_one_line_not_torchruns_traceback(shakespeare_dataset, tmp_path):
    """A mistake only a worker meets (here a dataset dir without a dataset: the config itself is fine): the worker
    says it in one line; before, torchrun's ChildFailedError traceback and failure table followed it."""
    overrides = [*tiny(shakespeare_dataset), f"data.dataset_dir={tmp_path / 'nodata'}"]
    launcher = torchrun(tmp_path / "run", overrides, 1)
    assert finish(launcher, timeout=120, ok=False) == [1]
    log = launcher.log_path.read_text()
    assert "Traceback" not in log and "ChildFailedError" not in log, log[-3000:]
    assert log.count("megagpt train: error: data.dataset_dir: ") == 1
    assert log.rstrip().splitlines()[-1] == ("torchrun: rank 0 (local rank 0) exited with code 2 and the job stopped "
                                             "(1 of its workers failed); its lines above say why")


def test_a_config_error_under_plain_torchrun_is_one_line_per_node_not_per_rank(shakespeare_dataset, tmp_path):
    """Without the script's check (torchrun run directly, the deepspeed launcher, Slurm without the script) both
    ranks meet the same bad config; only local rank 0 says so (a data or path error is every rank's)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megagpt", "train", str(BASE_CONFIG),
           *set_args(tiny(shakespeare_dataset, global_batch_tokens=GLOBAL_BATCH + 32)), "--run-dir", str(tmp_path)]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert log.count("megagpt train: error: ") == 1, log[-3000:]
    assert "train.global_batch_tokens=288 is not a multiple of" in log


@pytest.mark.parametrize("env, named", [
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0: expected a whole number of at least 1 (workers on this node)"),
    ({"NPROC_PER_NODE": "abc"}, "NPROC_PER_NODE=abc: expected a whole number of at least 1"),
    ({"NNODES": "-1"}, "NNODES=-1: expected a whole number of at least 1 (nodes in the job)"),
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2: expected a whole number from 0 to 1"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000: expected a whole number from 1 to 65535"),
    ({"SHUTDOWN_TIMEOUT": "1.5"}, "SHUTDOWN_TIMEOUT=1.5: expected a whole number of at least 0"),
    # before, torchrun's ValueError traceback ('bad host'), or a hang resolving 'a:b' as an IPv6 address
    ({"MASTER_ADDR": "bad host"}, "MASTER_ADDR=bad host: expected a host name or an IP address, without a port"),
    ({"MASTER_ADDR": "10.0.0.1:29500"}, "MASTER_ADDR=10.0.0.1:29500: expected a host name or an IP address"),
    ({"MASTER_ADDR": "a:b"}, "MASTER_ADDR=a:b: expected a host name or an IP address"),
    # before, torch's c10d retried the lookup, a warning a second, until the rendezvous timed out
    ({"MASTER_ADDR": "nosuchhost.invalid"}, "MASTER_ADDR=nosuchhost.invalid: does not resolve to an address here"),
    ({"NNODES": "2", "MASTER_ADDR": ""}, "MASTER_ADDR is unset: NNODES=2 needs the address of node 0")])
def test_torchrun_sh_names_a_bad_setting_in_one_line_before_starting_anything(env, named, tmp_path):
    clean = {k: v for k, v in child_env(NPROC_PER_NODE="1").items() if k not in ("NNODES", "NODE_RANK")}
    done = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "CONFIG"], cwd=tmp_path,
                          env={**clean, **env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"torchrun.sh: {named}")


@pytest.mark.parametrize("env, hostfile, named", [
    ({"MASTER_PORT": "0"}, None, "MASTER_PORT=0: expected a whole number from 1 to 65535"),
    ({"NUM_GPUS": "abc"}, None, "NUM_GPUS=abc: expected a whole number of at least 1 (workers on this node)"),
    ({}, "a slots=2\nb\n", 'HOSTFILE=HF line 2: expected "HOST slots=N" (N at least 1), got "b"'),
    ({}, "# nothing\n", "HOSTFILE=HF lists no host"),
    ({}, "a slots=2\n\na slots=1\n", "HOSTFILE=HF line 3: host a is listed again (line 1): one line per host"),
    ({"NODE_RANK": "2", "MASTER_ADDR": "a"}, "a slots=2 # 8 GPUs\n\nb slots=1\n",
     "NODE_RANK=2: expected a whole number from 0 to 1 (this node's index among the 2 host(s) of HOSTFILE)"),
    ({"MASTER_ADDR": "node-001:29500"}, None, "MASTER_ADDR=node-001:29500: expected a host name or an IP address"),
    # over ssh every host must resolve here; before, DeepSpeed's RuntimeError traceback (or pdsh's ssh errors)
    ({}, "localhost slots=1\n# 8 GPUs\nnosuchhost.invalid slots=1\n",
     "HOSTFILE=HF line 3: host nosuchhost.invalid: does not resolve to an address here"),
    ({"MASTER_ADDR": "nosuchhost.invalid"}, None, "MASTER_ADDR=nosuchhost.invalid: does not resolve to an address"),
    ({"NODE_RANK": "0", "MASTER_ADDR": "localhost"}, "a slots=2\nb slots=3\n",  # the config checked for 5 ranks
     "train.global_batch_tokens=100 is not a multiple of micro_batch_size × block_size × world_size = 12 × 64 × 5")])
def test_deepspeed_sh_names_a_bad_setting_in_one_line_before_starting_anything(env, hostfile, named, tmp_path):
    # before, DeepSpeed's runner printed its usage and an argparse error, or each rank the config's error
    if hostfile is not None:
        (tmp_path / "HF").write_text(hostfile)
        env = {**env, "HOSTFILE": "HF"}
    clean = {k: v for k, v in child_env().items() if k not in ("NUM_GPUS", "NODE_RANK", "HOSTFILE")}
    done = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), str(BASE_CONFIG), "--set",
                           "train.global_batch_tokens=100"], cwd=tmp_path, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert named in done.stderr
