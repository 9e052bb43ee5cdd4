"""Training and evaluation plumbing: the flat training loop, solver, sampler state, checkpoints, evaluation,
backbone pretraining and checkpoint conversion."""
