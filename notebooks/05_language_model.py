# %% [markdown]
# # 05 · A tiny byte-level language model
#
# A DEQ layer can be the whole trunk of a transformer: `revdeq.nn.DEQLanguageModel`
# embeds the tokens and solves `z* = f(z*, x)` for a causal transformer cell `f`
# (attention + MLP) with a fixed number of reversible steps, then a head gives the
# next-token logits at every position. Backprop through the solve uses
# `ReversibleAdjoint`, so training memory does not grow with the number of steps.
#
# The one idea here: a DEQ language model is an ordinary model to train and sample
# from. We train a very small byte-level model for a couple of hundred steps on the
# Python standard library's own sources (offline: `revdeq.data.load_text_corpus`),
# then generate text greedily and with a temperature. After so little training the
# text is only Python-flavoured noise; the loss curve is the point.

# %%
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import revdeq


corpus = revdeq.data.load_text_corpus(max_bytes=200_000)
train = corpus["train"]
print({split: len(tokens) for split, tokens in corpus.items()})
print(bytes(train[:120].astype(np.uint8)).decode("utf-8", "replace"))

# %% [markdown]
# ## The model
#
# 256 byte values, sequences of 64 bytes, width 64, 4 heads, 4 reversible steps (the
# default solver: `Reversible(beta=0.5)` with an `ExactState` that keeps one exponent
# per position, so the gradient is exact and the model stays exactly causal).

# %%
seq_len, batch_size, num_steps = 64, 16, 200
model = revdeq.nn.DEQLanguageModel(
    256, seq_len, 64, 4, key=jax.random.key(0), max_steps=4
)
print("parameters:", revdeq.nn.count_parameters(model))

optimiser = optax.adamw(3e-3)
opt_state = optimiser.init(eqx.filter(model, eqx.is_array))


def loss_fn(model, inputs, targets):
    logits = jax.vmap(model)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@eqx.filter_jit
def make_step(model, opt_state, inputs, targets):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, inputs, targets)
    updates, opt_state = optimiser.update(
        grads, opt_state, eqx.filter(model, eqx.is_array)
    )
    return eqx.apply_updates(model, updates), opt_state, loss


def sample_batch(rng):
    starts = rng.integers(0, len(train) - seq_len - 1, size=batch_size)
    window = np.stack([train[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    return jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


# %% [markdown]
# ## Training

# %%
rng = np.random.default_rng(0)
losses = []
start = time.perf_counter()
for step in range(num_steps):
    model, opt_state, loss = make_step(model, opt_state, *sample_batch(rng))
    losses.append(float(loss))
    if step % 25 == 0 or step == num_steps - 1:
        print(f"step {step:3d}  loss {losses[-1]:.3f}")
print(
    f"{num_steps} steps in {time.perf_counter() - start:.1f} s (including compilation)"
)

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(losses)
ax.axhline(np.log(256), color="grey", ls=":", label="uniform over bytes (log 256)")
ax.set_xlabel("training step")
ax.set_ylabel("cross-entropy (nats / byte)")
ax.set_title("DEQ language model: training loss")
ax.legend()
plt.show()


# %% [markdown]
# ## Sampling
#
# The model takes a fixed-length window. We place the prompt at the start of a window
# and, since the model is causal, read the logits at the last filled position; once
# the window is full it slides along. `temperature=0` is greedy decoding.


# %%
@eqx.filter_jit
def next_logits(model, window, position):
    return model(window)[position]


def generate(model, prompt, length, temperature=0.0, seed=0):
    tokens = list(prompt.encode())
    key = jax.random.key(seed)
    for _ in range(length):
        context = tokens[-seq_len:]
        window = (
            jnp.zeros(seq_len, jnp.int32).at[: len(context)].set(jnp.array(context))
        )
        logits = next_logits(model, window, jnp.asarray(len(context) - 1))
        if temperature == 0:
            token = int(jnp.argmax(logits))
        else:
            key, sub = jax.random.split(key)
            token = int(jax.random.categorical(sub, logits / temperature))
        tokens.append(token)
    return bytes(tokens).decode("utf-8", "replace")


prompt = "def "
print("greedy:\n" + generate(model, prompt, 80))
print("\ntemperature 0.8:\n" + generate(model, prompt, 80, temperature=0.8))

# %% [markdown]
# For a real run, `python experiments/language_model.py --model revdeq` trains on the
# whole corpus with the shared training loop (warmup, cosine decay, checkpoints,
# perplexity on held-out splits).
