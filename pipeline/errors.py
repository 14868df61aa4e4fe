"""User-facing errors: the CLI prints these as one line (a traceback only with --debug)."""


class PipelineError(Exception):
    """A problem the user can fix: bad config, missing data, missing model, bad store."""


class ConfigError(PipelineError):
    """A config value is missing, unknown or out of range; the message names the field."""


class DataError(PipelineError):
    """An input data file is missing or malformed; the message names the file."""


class ModelError(PipelineError):
    """A model cannot be resolved offline or its architecture is unsupported."""


def rerun_hint(stage: str, config: str | None, store_url: str | None = None) -> str:
    """The make command that builds what is missing, with the CONFIG and STORE the user ran with."""
    import shlex

    hint = f"make {stage} CONFIG={shlex.quote(config) if config else '...'}"
    return hint + (f" STORE={shlex.quote(str(store_url))}" if store_url else "")
