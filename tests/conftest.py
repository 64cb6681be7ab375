import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_global_state():
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _worker_launches(request, tmp_path_factory):
    from multiproc import WorkerLaunches

    return WorkerLaunches(request.session, tmp_path_factory)


@pytest.fixture
def shared_runs(request, _worker_launches):
    """This module's multi-process runs (its ``worker_runs(tmp, selected)`` hook) in the session's shared launches of
    the ranks, one per world size (``multiproc.WorkerLaunches``): ``outputs(world, key)``, ``argv``, ``tmp``."""
    return _worker_launches.view(request.module)
