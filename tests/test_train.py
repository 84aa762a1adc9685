import signal
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import revdeq.train as rt


def _dataset(key, n=256):
    """A linearly separable two-class problem in two dimensions."""
    x = jr.normal(key, (n, 2))
    y = (x @ jnp.array([1.0, -2.0]) > 0).astype(jnp.int32)
    return x, y


def _loss_fn(model, batch, key):
    x, y = batch
    x = x + 0.01 * jr.normal(key, x.shape)  # Makes the result depend on the key.
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"accuracy": jnp.mean(logits.argmax(-1) == y)}


def _setup(total_steps=40):
    model = eqx.nn.MLP(2, 2, width_size=16, depth=1, key=jr.PRNGKey(0))
    optimiser = rt.make_optimiser(
        0.05, total_steps=total_steps, warmup_steps=5, weight_decay=1e-4
    )
    return model, rt.init_optimiser(optimiser, model), rt.make_step(_loss_fn, optimiser)


def _train(step, model, opt_state, key, data, first, last, batch_size=64):
    """Run steps `first..last-1`; batch `i` is a fixed function of `i`."""
    x, y = data
    metrics = []
    for i in range(first, last):
        idx = jr.permutation(jr.fold_in(jr.PRNGKey(1), i), len(x))[:batch_size]
        key, step_key = jr.split(key)
        model, opt_state, m = step(model, opt_state, (x[idx], y[idx]), step_key)
        metrics.append(m)
    return model, opt_state, key, metrics


def _assert_trees_equal(a, b):
    leaves_a = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    leaves_b = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(leaves_a) == len(leaves_b) > 0
    for leaf_a, leaf_b in zip(leaves_a, leaves_b):
        assert leaf_a.dtype == leaf_b.dtype
        assert jnp.array_equal(leaf_a, leaf_b)


@pytest.mark.standard_promotion  # optax's Adam
def test_training_lowers_loss():
    model, opt_state, step = _setup()
    data = _dataset(jr.PRNGKey(2))
    model, _, _, metrics = _train(step, model, opt_state, jr.PRNGKey(3), data, 0, 40)
    assert set(metrics[0]) == {"loss", "accuracy", "grad_norm"}
    assert metrics[-1]["loss"] < 0.3 * metrics[0]["loss"]
    eval_step = rt.make_eval_step(
        lambda model, batch: _loss_fn(model, batch, jr.PRNGKey(0))[1]
    )
    assert eval_step(model, _dataset(jr.PRNGKey(4)))["accuracy"] > 0.95


@pytest.mark.standard_promotion  # optax's Adam
def test_checkpoint_resume_is_exact(tmp_path):
    data = _dataset(jr.PRNGKey(2))
    model, opt_state, step = _setup()
    full, full_opt_state, _, _ = _train(
        step, model, opt_state, jr.PRNGKey(3), data, 0, 20
    )

    half, half_opt_state, key, _ = _train(
        step, model, opt_state, jr.PRNGKey(3), data, 0, 10
    )
    rt.save_checkpoint(
        tmp_path, 10, half, half_opt_state, {"key": key, "next_step": 10}
    )
    fresh, fresh_opt_state, _ = _setup()
    restored_step, restored, restored_opt_state, extra = rt.restore_checkpoint(
        tmp_path, fresh, fresh_opt_state
    )
    assert restored_step == 10
    key = jnp.asarray(extra["key"], jnp.uint32)
    _assert_trees_equal(restored, half)
    resumed, resumed_opt_state, _, _ = _train(
        step, restored, restored_opt_state, key, data, extra["next_step"], 20
    )
    _assert_trees_equal(resumed, full)
    _assert_trees_equal(resumed_opt_state, full_opt_state)


def test_checkpoint_keep_last(tmp_path):
    model, opt_state, _ = _setup()
    for step in (1, 2, 10, 3, 20):
        rt.save_checkpoint(tmp_path, step, model, opt_state, keep=2)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["checkpoint_000000010.eqx", "checkpoint_000000020.eqx"]
    assert rt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000000020.eqx"
    assert rt.restore_checkpoint(tmp_path, model, opt_state, step=10)[0] == 10
    with pytest.raises(FileNotFoundError, match="step 3"):
        rt.restore_checkpoint(tmp_path, model, opt_state, step=3)
    with pytest.raises(ValueError, match="`keep`"):
        rt.save_checkpoint(tmp_path, 30, model, opt_state, keep=0)


def test_checkpoint_ignores_partial_writes(tmp_path):
    model, opt_state, _ = _setup()
    assert rt.latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="any checkpoint"):
        rt.restore_checkpoint(tmp_path, model, opt_state)
    # What a crash during a save leaves behind.
    partial = tmp_path / ".checkpoint_x1y2z3.tmp"
    partial.write_bytes(b'{"step": 99, "extra": {}}\n\x93NUMPY')
    assert rt.latest_checkpoint(tmp_path) is None

    rt.save_checkpoint(tmp_path, 5, model, opt_state)
    assert rt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000000005.eqx"
    assert not partial.exists()


def _train_with_checkpoints(directory, last):
    """Train to step `last`, checkpointing after every step; resume from the latest
    complete checkpoint in `directory` if there is one."""
    data = _dataset(jr.PRNGKey(2))
    model, opt_state, step = _setup()
    first, key = 0, jr.PRNGKey(3)
    if rt.latest_checkpoint(directory) is not None:
        first, model, opt_state, extra = rt.restore_checkpoint(
            directory, model, opt_state
        )
        key = jnp.asarray(extra["key"], jnp.uint32)
    for i in range(first, last):
        model, opt_state, key, _ = _train(step, model, opt_state, key, data, i, i + 1)
        rt.save_checkpoint(directory, i + 1, model, opt_state, {"key": key})
    return first, model, opt_state


# Killed by SIGKILL while it writes the checkpoint of step 6: the file is written
# but not yet renamed into place.
_KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import test_train as t

    replace = os.replace

    def replace_or_die(tmp, path):
        if str(path).endswith("checkpoint_000000006.eqx"):
            os.kill(os.getpid(), signal.SIGKILL)
        replace(tmp, path)

    os.replace = replace_or_die
    t._train_with_checkpoints(sys.argv[1], 10)
    """
)


@pytest.mark.standard_promotion  # optax's Adam
def test_training_killed_while_checkpointing_resumes_exactly(tmp_path):
    from .helpers import script_environment

    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SCRIPT, str(tmp_path / "killed")],
        env=script_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(path.name for path in (tmp_path / "killed").iterdir())
    assert len(left) == 4 and left[0].startswith(".checkpoint_")  # steps 3 to 5
    assert rt.latest_checkpoint(tmp_path / "killed").name == "checkpoint_000000005.eqx"

    first, resumed, resumed_opt_state = _train_with_checkpoints(tmp_path / "killed", 10)
    assert first == 5
    _, full, full_opt_state = _train_with_checkpoints(tmp_path / "full", 10)
    _assert_trees_equal(resumed, full)
    _assert_trees_equal(resumed_opt_state, full_opt_state)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda data: data[:-100], "bytes of arrays"),
        (lambda data: data[:-100] + bytes([data[-100] ^ 1]) + data[-99:], "SHA-256"),
        (lambda data: b"\x00garbage" + data, "not a revdeq checkpoint header"),
        (lambda data: data[:10], "not a revdeq checkpoint header"),
    ],
    ids=["truncated", "bit-flip", "header", "cut-header"],
)
def test_damaged_checkpoint_is_refused_by_name(tmp_path, damage, why):
    model, opt_state, _ = _setup()
    path = rt.save_checkpoint(tmp_path, 7, model, opt_state)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=f"{path}.*damaged.*{why}"):
        rt.restore_checkpoint(tmp_path, model, opt_state)


def test_checkpoint_extra(tmp_path):
    model, opt_state, _ = _setup()
    typed_key = jr.key(7)
    extra = {"epoch": 3, "name": "run", "typed_key": typed_key, "lr": np.float32(0.5)}
    rt.save_checkpoint(tmp_path, 0, model, opt_state, extra)
    _, _, _, restored = rt.restore_checkpoint(tmp_path, model, opt_state)
    assert restored["epoch"] == 3 and restored["name"] == "run"
    assert restored["lr"] == 0.5
    rebuilt = jr.wrap_key_data(jnp.asarray(restored["typed_key"], jnp.uint32))
    assert jnp.array_equal(jr.key_data(rebuilt), jr.key_data(typed_key))
    with pytest.raises(TypeError, match="not JSON data"):
        rt.save_checkpoint(tmp_path, 1, model, opt_state, {"bad": object()})
    assert rt.latest_checkpoint(tmp_path).name == "checkpoint_000000000.eqx"


@pytest.mark.standard_promotion  # optax's Adam
def test_optimiser_schedule():
    # With a constant gradient, each AdamW update is (minus) the learning rate.
    optimiser = rt.make_optimiser(
        0.1, total_steps=10, warmup_steps=4, final_learning_rate=0.01
    )
    params = jnp.zeros(())
    state = optimiser.init(params)
    rates = []
    for _ in range(12):
        updates, state = optimiser.update(jnp.ones(()), state, params)
        rates.append(-float(updates))
    np.testing.assert_allclose(rates[:5], [0.0, 0.025, 0.05, 0.075, 0.1], atol=1e-6)
    assert all(a > b for a, b in zip(rates[4:10], rates[5:10]))
    np.testing.assert_allclose(rates[10:], 0.01, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_steps=11), "warmup_steps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(clip_norm=0.0), "clip_norm"),
        (dict(final_learning_rate=1.0), "final_learning_rate"),
    ],
)
def test_optimiser_errors(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        rt.make_optimiser(**{"learning_rate": 0.1, "total_steps": 10, **kwargs})


def test_metrics_logger_and_plot(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = rt.MetricsLogger(path)
    logger.log(step=0, loss=jnp.asarray(2.5), accuracy=np.float32(0.25), split="train")
    logger.log(step=1, loss=jnp.asarray([1.5]), num_steps=jnp.asarray(4))
    logger.log(step=1, test_accuracy=0.5)
    records = rt.read_metrics(path)
    assert records[0] == {"step": 0, "loss": 2.5, "accuracy": 0.25, "split": "train"}
    assert records[1] == {"step": 1, "loss": 1.5, "num_steps": 4}
    assert type(records[1]["num_steps"]) is int
    with pytest.raises(ValueError, match="`loss` must be a scalar"):
        logger.log(step=2, loss=jnp.zeros(3))

    out = tmp_path / "plots" / "loss.png"
    other = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 1.0}]
    rt.plot_learning_curves({"a": path, "b": other}, "loss", out, log_y=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'b' has no records"):
        rt.plot_learning_curves({"b": other}, "accuracy", out)


@pytest.mark.standard_promotion  # optax's Adam
def test_data_parallel_single_device():
    parallel = rt.DataParallel()
    model, opt_state, step = _setup()
    model, opt_state = parallel.replicate((model, opt_state))
    batch = parallel.shard_batch(_dataset(jr.PRNGKey(2), n=64))
    assert batch[0].sharding == parallel.batch_sharding
    _, _, metrics = step(model, opt_state, batch, jr.PRNGKey(0))
    assert jnp.isfinite(metrics["loss"])


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(
        jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw))
    )
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not rt.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert rt.maybe_initialize_distributed()
    assert calls == [(("10.0.0.1:1234",), {"num_processes": 2, "process_id": 1})]


# Runs in a fresh process: the device count is fixed when JAX first initialises.
_DATA_PARALLEL_SCRIPT = textwrap.dedent(
    """
    import json
    import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr
    import test_train as t
    import revdeq.train as rt

    assert jax.device_count() == 4, jax.devices()
    parallel = rt.DataParallel()
    data = t._dataset(jr.PRNGKey(2))
    model, opt_state, step = t._setup()
    single, _, _, _ = t._train(step, model, opt_state, jr.PRNGKey(3), data, 0, 5)
    model, opt_state = parallel.replicate((model, opt_state))
    sharded = parallel.shard_batch(data)
    assert len(sharded[0].addressable_shards) == 4
    assert sharded[0].addressable_shards[0].data.shape == (64, 2)
    multi, _, _, _ = t._train(step, model, opt_state, jr.PRNGKey(3), sharded, 0, 5)
    leaves = jax.tree.leaves(eqx.filter(multi, eqx.is_array))
    try:
        parallel.shard_batch(jnp.zeros((6, 2)))
        indivisible_error = None
    except ValueError as e:
        indivisible_error = str(e)
    print(json.dumps({
        "max_abs_diff": max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(eqx.filter(single, eqx.is_array)), leaves)
        ),
        "replicated": all(leaf.sharding.is_fully_replicated for leaf in leaves),
        "indivisible_error": indivisible_error,
    }))
    """
)


@pytest.mark.standard_promotion  # optax's Adam
def test_data_parallel_matches_single_device():
    # Imported here: the script imports this module as a top-level one.
    from .helpers import run_script

    out = run_script(_DATA_PARALLEL_SCRIPT, "--xla_force_host_platform_device_count=4")
    assert out["max_abs_diff"] < 1e-6
    assert out["replicated"]
    assert "divisible by the number of devices" in out["indivisible_error"]
