import pytest

from mgsr_megatron.config import ModelConfig
from mgsr_megatron.errors import UserError
from mgsr_megatron.parallel import discover_env, expand_nodelist, parallel_groups, validate_layout


def test_torchrun_env():
    env = discover_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                        "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 4, 1, "n1", 1234, "torchrun")  # torchrun wins over the launcher task's SLURM_* variables


def test_slurm_direct_env():
    env = discover_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[07-08,10],cpu1", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "gpu07", "slurm")
    assert env.master_port == 20000 + 4242


def test_mpi_env_uses_broadcast():
    env = discover_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                        "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, mpi_bcast=lambda obj: ("10.0.0.5", 4000))
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (1, 2, 1, "10.0.0.5", 4000, "mpi")
    env = discover_env({"PMI_RANK": "0", "PMI_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "99"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (0, 3, "h", 99)


def test_single_process_env():
    env = discover_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "missing rendezvous variable(s): MASTER_ADDR, MASTER_PORT"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM launch is missing SLURM_JOB_NODELIST"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
])
def test_missing_rendezvous(env, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        discover_env(env)


def test_nodelist():
    assert expand_nodelist("a[1-3],b,c[09-10]") == ["a1", "a2", "a3", "b", "c09", "c10"]
    assert expand_nodelist("node001") == ["node001"]


def test_groups_world8_tp2_pp2():
    groups = parallel_groups(8, 2, 2)  # Megatron's order: TP innermost, then DP, PP outermost
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_groups_world4_tp2_pp2():
    assert parallel_groups(4, 2, 2) == {"tp": [[0, 1], [2, 3]], "dp": [[0], [1], [2], [3]], "pp": [[0, 2], [1, 3]]}


def test_groups_world8_tp2_pp1():
    groups = parallel_groups(8, 2, 1)
    assert groups["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]] and groups["pp"] == [[r] for r in range(8)]


@pytest.mark.parametrize("world,tp,pp,model,message", [
    (6, 4, 1, {}, "world size 6 is not a multiple of TP\\*PP = 4\\*1 = 4"),
    (4, 4, 1, {"num_attention_heads": 6, "hidden_size": 96}, "TP=4 does not divide num_attention_heads=6"),
    (4, 4, 1, {"num_query_groups": 2}, "TP=4 does not divide num_query_groups=2"),
    (2, 2, 1, {"ffn_hidden_size": 99}, "TP=2 does not divide ffn_hidden_size=99"),
    (4, 1, 4, {"num_layers": 2}, "PP=4 is larger than num_layers=2"),
    (0, 0, 1, {}, "must be >= 1"),
])
def test_layout_errors(world, tp, pp, model, message):
    with pytest.raises(UserError, match=message) as err:
        validate_layout(world, tp, pp, {"student": ModelConfig(**model)})
    assert "\n" not in str(err.value)


def test_unreachable_rendezvous_is_reported_with_host_and_port():
    import socket
    import time

    from mgsr_megatron.parallel import DistEnv, wait_for_rendezvous

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UserError, match=f"rank 1 cannot reach the rendezvous at 127.0.0.1:{port} "
                                        r"\(torchrun launch\) within 2 s"):
        wait_for_rendezvous(DistEnv(1, 2, 0, "127.0.0.1", port, "torchrun"), timeout_s=2)
    assert time.monotonic() - start < 10
    wait_for_rendezvous(DistEnv(0, 2, 0, "127.0.0.1", port, "torchrun"), timeout_s=2)  # rank 0 hosts it
