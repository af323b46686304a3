"""Errors a user can act on. The CLI prints their message without a traceback."""


class PipelineError(Exception):
    """A problem with inputs, configuration or storage, explained in the message."""


class ConfigError(PipelineError):
    """The configuration is invalid or does not match existing outputs."""


class UnsafeWeightsError(PipelineError):
    """A weights file would need to execute pickled code to load."""
