import os
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import ArrayLike, PyTree


def maybe_initialize_distributed() -> bool:
    """Initialise multi-host JAX when the environment asks for it.

    Calls `jax.distributed.initialize` if `$JAX_COORDINATOR_ADDRESS` is set, passing
    `$JAX_NUM_PROCESSES` and `$JAX_PROCESS_ID` when they are set (otherwise JAX
    detects them on supported clusters, e.g. SLURM or Cloud TPU). Call it once per
    process, before any other JAX call. With no such variables it does nothing, so a
    single-host script can call it unconditionally.

    **Returns:**

    `True` if this call initialised the distributed runtime, else `False`.

    !!! Example

        ```bash
        # On each of 2 hosts (process ids 0 and 1):
        JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
            python train.py
        ```
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None or jax.distributed.is_initialized():
        return False
    num_processes = os.environ.get("JAX_NUM_PROCESSES")
    process_id = os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        address,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id),
    )
    return True


def _put(tree: PyTree, place: Callable[[ArrayLike], jax.Array]) -> PyTree:
    """Apply `place` to every array leaf of `tree`, keeping the other leaves."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(place, arrays), static)


class DataParallel(eqx.Module):
    """Data parallelism over a one-dimensional device mesh.

    The model and optimiser state are replicated on every device, and each batch is
    split along its leading axis. A step built by [`revdeq.train.make_step`][] then
    runs unchanged: XLA partitions the computation and averages the gradients
    across devices. The result equals a single-device step up to floating-point
    reduction order.

    **Multi-host use:** call [`revdeq.train.maybe_initialize_distributed`][] at
    start-up, then have each process load only its own share of every global batch
    (e.g. `batch_size // jax.process_count()` examples, with a different data key or
    `start` per process). `shard_batch` assembles the per-process shares into one
    global array with `jax.make_array_from_process_local_data`. Save checkpoints
    from process 0 only (`jax.process_index() == 0`).

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax
        import revdeq


        model = eqx.nn.Linear(4, 3, key=jax.random.key(0))

        batches = [(jnp.ones((8, 4)), jnp.ones((8, 3)))] * 2
        key = jax.random.key(1)


        def loss_fn(model, batch, key):
            x, y = batch
            return jnp.mean((jax.vmap(model)(x) - y) ** 2), {}


        optimiser = optax.sgd(0.1)
        opt_state = revdeq.train.init_optimiser(optimiser, model)
        step = revdeq.train.make_step(loss_fn, optimiser)

        parallel = revdeq.train.DataParallel()
        model, opt_state = parallel.replicate((model, opt_state))
        for batch in batches:
            batch = parallel.shard_batch(batch)
            model, opt_state, metrics = step(model, opt_state, batch, key)
        ```
    """

    mesh: Mesh
    axis_name: str

    def __init__(
        self,
        # `jax.Device` is an alias of jaxlib's class, which pyright cannot resolve.
        devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
        axis_name: str = "data",
    ) -> None:
        """**Arguments:**

        - `devices`: the devices to use. Defaults to `jax.devices()`: every device of
            every process.
        - `axis_name`: the name of the mesh axis.
        """
        devices = jax.devices() if devices is None else list(devices)
        if not devices:
            raise ValueError("`devices` must not be empty.")
        self.mesh = Mesh(np.array(devices), (axis_name,))
        self.axis_name = axis_name

    @property
    def replicated(self) -> NamedSharding:
        """The sharding that puts a full copy of an array on every device."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        """The sharding that splits an array's leading axis across devices."""
        return NamedSharding(self.mesh, PartitionSpec(self.axis_name))

    def replicate(self, tree: PyTree) -> PyTree:
        """Copy every array of `tree` to every device.

        Use it on the model and optimiser state; non-array leaves are kept as they
        are.
        """
        return _put(tree, lambda x: jax.device_put(x, self.replicated))

    def shard_batch(self, batch: PyTree) -> PyTree:
        """Split every array of `batch` along its leading axis across devices.

        On several hosts, each process passes its own share of the global batch.
        The leading axis of each share must be divisible by the number of local
        devices.
        """
        num_local = len(self.mesh.local_devices)

        def shard(x):
            if x.ndim == 0 or x.shape[0] % num_local != 0:
                raise ValueError(
                    f"Cannot shard a batch array of shape {x.shape} across "
                    f"{num_local} local devices: its leading axis must be divisible "
                    "by the number of devices."
                )
            return jax.make_array_from_process_local_data(self.batch_sharding, x)

        return _put(batch, shard)
