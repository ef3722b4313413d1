import pytest

@pytest.fixture(params=["zarr", "parquet"])
def backend(request):
    return request.param


_memory_counter = iter(range(10**9))


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "labels.store")
    return f"memory://distill-tests/{next(_memory_counter)}/labels.store"
