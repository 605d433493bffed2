"""Training on several processes: who is who (world), how the model is split (apply), sharded
checkpoints, the local launcher and the hang watchdog. docs/distributed.md describes the use.

The loop stays the one single-process loop: parallelism is a function applied to the model
(`parallelize`), and the few places that differ (data shard, global loss normalisation, who writes
files) ask the `World`.
"""
