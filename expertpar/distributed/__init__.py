"""Expert parallelism on Ray: placement, expert and router actors, the bridge, the job."""
