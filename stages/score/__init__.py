"""Score stage: out-of-core statistics over cached features.

``variability`` (hidden-state variability per layer), ``sparsity`` (FFN
firing statistics) and ``plots`` are pure functions of dask/numpy arrays;
they know nothing about models or the store.
"""
