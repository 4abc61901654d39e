"""Errors a user can act on. The CLI prints their message (no traceback) and exits with their code."""


class NeuronserveError(Exception):
    exit_code = 1


class ConfigError(NeuronserveError):
    """The config file is wrong: the message names file, line and key."""

    exit_code = 2


class PlanError(NeuronserveError):
    """The config asks for something this host cannot do (too many cores, a port clash, ...)."""

    exit_code = 2


class DeviceError(NeuronserveError):
    """Device discovery failed or a backend's framework is missing."""


class ArtifactError(NeuronserveError):
    """A compiled model is missing, damaged, or was compiled for another backend."""


class ServiceError(NeuronserveError):
    """A systemctl call, a unit, nginx or a group's readiness failed: the message names which, and why."""


class RenderError(NeuronserveError):
    """A template failed to render or a rendered file could not be written."""
