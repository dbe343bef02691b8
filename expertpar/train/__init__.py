"""Training: the one loop and its runtimes' shared parts — step, parameter owners, optimizer
and schedule, CLIP loss, checkpoints and their names, metrics.

Nothing is imported here: the expert and router actors import only the parts they use
(checkpoints, owners, names), not the data pipeline, tokenizers and eval behind the loop, which
would add seconds to every actor's start.
"""
