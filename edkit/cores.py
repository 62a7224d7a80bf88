"""How edkit uses a CPU's cores: one JAX device per core, LAPACK single-threaded inside each.

A refinement's cost is its eigendecompositions, and XLA runs a batch of them as one LAPACK
call after another on one thread; XLA's own threads do not split them. What does use every
core is JAX's frame sharding (``devices``): one CPU device per core, each solving its frames,
with LAPACK's BLAS kept to one thread so that the devices do not fight over the cores
(measured on 2 cores: a complex 37 × 37 ``eigh`` batch 0.70 s on one device → 0.38 s on two;
a real 800 × 800 one 53 ms → 42 ms per matrix; two devices whose BLAS keeps two threads each
are slower than one device, 76 ms).

So ``import edkit`` asks JAX for one CPU device per usable core (``jax_num_cpu_devices``)
when JAX has not started yet and nobody chose a count (``XLA_FLAGS``'
``--xla_force_host_platform_device_count``, or ``jax_num_cpu_devices`` set before), and then
limits the BLAS that SciPy's LAPACK uses (and with it jaxlib's) to one thread. Set
``EDKIT_CPU_DEVICES=1`` before importing edkit to keep JAX's single CPU device and the BLAS
threads as they were; ``EDKIT_CPU_DEVICES=N`` asks for N devices.
"""

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import jax

#: Environment variable: the number of CPU devices ``import edkit`` asks JAX for.
ENVIRONMENT = "EDKIT_CPU_DEVICES"
#: More devices than this give a chunk of frames per device and little more speed.
MAX_DEVICES = 8

_configured: dict[str, Any] = {"devices": None, "blas": None}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _requested_devices() -> int | None:
    """The device count from ``EDKIT_CPU_DEVICES`` (None: unset or not a positive integer)."""
    value = os.environ.get(ENVIRONMENT, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        warnings.warn(f"{ENVIRONMENT}={value!r} is not a positive integer; ignored", stacklevel=3)
        return None
    return count


def configure_cpu_devices() -> int | None:
    """Ask JAX for one CPU device per usable core (at most :data:`MAX_DEVICES`), once.

    Nothing changes when someone chose already (``XLA_FLAGS`` or ``jax_num_cpu_devices``) or
    when JAX has started (its device count is fixed then). Returns the count asked for, or None.
    """
    if _configured["devices"] is not None:
        return int(_configured["devices"])
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.config.jax_num_cpu_devices != -1:  # type: ignore[attr-defined]
        return None
    requested = _requested_devices()
    count = min(usable_cores(), MAX_DEVICES) if requested is None else requested
    if count <= 1:
        return None
    return request_cpu_devices(count)


def request_cpu_devices(count: int) -> int | None:
    """Ask JAX for ``count`` CPU devices (before its first computation) and keep LAPACK's BLAS
    to one thread per call; returns ``count``, or None when JAX has already started (or for a
    count below 1, which the refinement's options refuse with a message)."""
    if count < 1:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:  # JAX already ran something: its devices are fixed
        return None
    _configured["devices"] = int(count)
    if count > 1:
        single_threaded_lapack()
    else:
        restore_lapack_threads()
    return int(count)


def single_threaded_lapack() -> None:
    """Limit the BLAS under SciPy's LAPACK (which jaxlib's ``eigh`` calls) to one thread.

    NumPy's own BLAS, a separate library, keeps its threads. Without threadpoolctl (or without
    an OpenBLAS/MKL it knows) nothing changes.
    """
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's BLAS, to be limited)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return
    controller = ThreadpoolController()
    # SciPy's wheels carry their BLAS in scipy.libs/; a shared system BLAS is left alone.
    scipy_blas = [
        lib
        for lib in controller.lib_controllers
        if os.path.basename(os.path.dirname(lib.filepath)) == "scipy.libs"
    ]
    if _configured["blas"] is None:  # the threads to give back (restore_lapack_threads)
        _configured["blas"] = [(lib, lib.num_threads) for lib in scipy_blas]
    for lib in scipy_blas:
        lib.set_num_threads(1)


def restore_lapack_threads() -> None:
    """Give SciPy's BLAS back the threads :func:`single_threaded_lapack` took."""
    for lib, threads in _configured["blas"] or ():
        lib.set_num_threads(threads)
    _configured["blas"] = None


@contextlib.contextmanager
def threaded_lapack() -> Iterator[None]:
    """Inside: SciPy's BLAS has its threads back, for a lone solve that no sharding splits
    (one pattern: a real 600 × 600 ``eigh`` takes about 1.5× longer on one thread). Call
    synchronously (block on the result inside); a no-op when nothing was limited."""
    limited = _configured["blas"]
    if not limited:
        yield
        return
    for lib, threads in limited:
        lib.set_num_threads(threads)
    try:
        yield
    finally:
        if _configured["blas"]:
            for lib, _ in limited:
                lib.set_num_threads(1)


def default_devices() -> int:
    """The devices a refinement shards its frames over by default: every local device of JAX's
    default backend (on CPU, the ones :func:`configure_cpu_devices` asked for)."""
    return jax.local_device_count()


def devices_for(n_frames: int, chunk_frames: int | None = None) -> int:
    """Devices to shard ``n_frames`` frames over by default: every local device
    (:func:`default_devices`), no more than the frames and, for a given chunk size, a divisor of
    it (so that no shard is padded with a repeated frame)."""
    count = max(1, min(default_devices(), int(n_frames)))
    if chunk_frames is not None:
        chunk = max(1, int(chunk_frames))
        count = max(d for d in range(1, min(count, chunk) + 1) if chunk % d == 0)
    return count


def describe() -> str:
    """One line: the devices JAX sees and how many threads LAPACK's BLAS has (for reports)."""
    devices = jax.local_devices()
    kinds = f"{len(devices)} × {devices[0].platform}" if devices else "no device"
    limited = _configured["blas"]
    blas = "LAPACK's BLAS single-threaded" if limited else "LAPACK's BLAS threads unchanged"
    return f"{kinds} device(s), {usable_cores()} usable core(s), {blas}"
