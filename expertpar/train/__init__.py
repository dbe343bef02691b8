"""Training: the one loop and its runtimes' shared parts — step, parameter owners, optimizer
and schedule, CLIP loss, checkpoints and their names, metrics.

Nothing is imported here: the expert and router actors import only the parts they use
(checkpoints, owners, names), not the data pipeline and torchvision behind the loop, which
would add about 1.5 s to every actor's start.
"""
