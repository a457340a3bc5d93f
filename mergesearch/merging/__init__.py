"""The merge engine: operators (ops, sparsify), plans (plan, resolve), one-shot merges (run) and the
resident in-place fast path (apply). Import from the submodules; this package imports nothing heavy."""
