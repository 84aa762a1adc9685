"""revdeq: Reversible Deep Equilibrium Models in JAX/Equinox."""
