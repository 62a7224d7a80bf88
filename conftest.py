"""Shared by every pytest run in this repository (tests/ and the notebooks alike)."""

import os


def _pin_xdist_worker() -> None:
    """Give each pytest-xdist worker (``-n N``) its own share of the cores, before any library
    starts a thread; subprocesses (notebook kernels, CLI runs) inherit it.

    Unpinned, each worker's OpenBLAS and XLA start one thread per core and the workers' threads
    fight over the same cores: the slow suite took 32 min in two processes against 26 min in
    one; pinned, one core each, 18 min (2026-12-05, 2 cores). Only with ``EDKIT_TEST_PIN=1``
    (``make test-slow`` sets it): the default suite's short tests gain nothing (483 s pinned, 441 s
    not), since near its end one worker is left and unpinned it uses both cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or os.environ.get("EDKIT_TEST_PIN") != "1":
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < count:
        return
    share = cores[int(worker[2:]) % count :: count]
    os.sched_setaffinity(0, share)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(len(share))


_pin_xdist_worker()
