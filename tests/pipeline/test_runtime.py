"""Where a stage runs, checked on the CPU: torchrun ranks' devices, the process group, weight dtypes.

CUDA is simulated (``torch.cuda.is_available`` and friends patched): what is checked is which
device each rank asks for and what it hands the process group, not CUDA itself.
"""

import datetime

import pytest
import torch

from distill.errors import ConfigError
from distill.pipeline import runtime
from distill.pipeline.runtime import resolve_device, weight_dtype, workers


@pytest.fixture
def gpus(monkeypatch):
    """Four simulated CUDA devices; returns the list of devices made current."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return current


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_each_torchrun_rank_takes_its_own_gpu_and_makes_it_current(gpus, monkeypatch, name):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_device(name) == torch.device("cuda", 2)
    assert gpus == [torch.device("cuda", 2)]


def test_outside_torchrun_cuda_is_the_first_gpu(gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0) and gpus == [torch.device("cuda", 0)]
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_local_rank_wraps_around_the_visible_devices(gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")  # e.g. one GPU per node visible to each of 8 ranks' groups
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_one_fixed_gpu_for_several_ranks_of_a_node_is_refused(gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="every torchrun rank of this node on one GPU: use --device cuda"):
        resolve_device("cuda:0")
    assert gpus == []


def test_a_gpu_index_past_the_machine_is_refused(gpus):
    with pytest.raises(ConfigError, match="has 4 CUDA device"):
        resolve_device("cuda:4")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_the_nccl_group_is_bound_to_the_ranks_gpu_before_it_connects(gpus, monkeypatch):
    calls, barriers = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    def init_process_group(backend, timeout=None, device_id=None):  # torch's signature, as far as used
        calls.append((backend, {"timeout": timeout, "device_id": device_id}))

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kw: barriers.append(kw))
    device = resolve_device("cuda")
    team = workers(None, device)
    assert gpus == [torch.device("cuda", 1)]  # current before the group exists
    [(backend, options)] = calls
    assert backend == "nccl" and options["device_id"] == torch.device("cuda", 1)
    assert options["timeout"] >= datetime.timedelta(days=1)
    team.barrier()
    assert barriers == [{"device_ids": [1]}]
    assert (team.rank, team.world, team.distributed) == (1, 2, True)


def test_a_cpu_group_is_gloo_without_a_device(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    team = workers(None, torch.device("cpu"))
    assert calls[0][0] == "gloo" and "device_id" not in calls[0][1] and team.device is None


def test_a_teacher_on_cuda_loads_in_bf16_by_default_and_in_fp32_on_the_cpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert weight_dtype("auto", cuda) == torch.bfloat16 and weight_dtype("auto", cpu) is None
    assert weight_dtype("fp32", cuda) is None and weight_dtype("fp16", cpu) == torch.float16
    assert runtime.compute_dtype("auto", cuda) == torch.bfloat16 and runtime.compute_dtype("auto", cpu) == torch.float32


def test_copies_are_asynchronous_only_from_pinned_memory(monkeypatch):
    seen = []
    batch = {"a": torch.zeros(2)}
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: seen.append(non_blocking) or self)
    runtime.to_device(batch, torch.device("cuda", 0))
    assert seen == [False]  # pageable memory: a non_blocking copy would be synchronous anyway
