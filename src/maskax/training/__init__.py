"""How an experiment is trained: loop, evaluation, sharding, checkpoints, progress."""
