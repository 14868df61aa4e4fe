"""User-facing errors: the CLI prints these as one line (a traceback only with --debug)."""


class PipelineError(Exception):
    """A problem the user can fix: bad config, missing data, missing model, bad store."""


class ConfigError(PipelineError):
    """A config value is missing, unknown or out of range; the message names the field."""


class DataError(PipelineError):
    """An input data file is missing or malformed; the message names the file."""


class ModelError(PipelineError):
    """A model cannot be resolved offline or its architecture is unsupported."""
