"""What operates a host: apply, status, cleanup, doctor, up, the ML environment join, systemctl."""
