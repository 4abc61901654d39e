"""What builds artifacts: compile, the artifact format, the backends that trace and load them, and their memory
footprint."""
