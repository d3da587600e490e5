"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class TuneforgeError(Exception):
    """Base class: the message alone must tell the user what is wrong and what to do."""


class ConfigError(TuneforgeError):
    """A config key is unknown, has the wrong type, or conflicts with another."""


class DataError(TuneforgeError):
    """A dataset is missing, malformed or empty."""


class ModelError(TuneforgeError):
    """A model or adapter cannot be found or loaded."""


class CheckpointError(TuneforgeError):
    """A checkpoint or output directory is unusable."""


class TrainingDiverged(TuneforgeError):
    """The loss or the weights became NaN or inf; nothing of that step was saved."""


class ConfigErrors(ConfigError):
    """Several blockers of one config, found in one check; `messages` holds one line each (the
    CLI prints each as its own error line). str() is the lines joined by newlines."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


def config_error(messages: list[str]) -> ConfigError:
    """One ConfigError for one message, ConfigErrors for several."""
    return ConfigError(messages[0]) if len(messages) == 1 else ConfigErrors(messages)
