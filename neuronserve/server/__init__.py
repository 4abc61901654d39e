"""The ASGI server a group's worker runs: settings -> app -> batcher -> executor -> backend."""
