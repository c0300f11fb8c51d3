"""Errors raised while configuring and running models.

    InferenceError
    ├── ConfigError (ValueError)         -- a bad models file or entry; fails at start
    ├── UnknownModel (KeyError)          -- a name the registry does not have
    ├── InvalidInput (ValueError)        -- one job's input cannot be used; fails that job
    └── TransientError                   -- may succeed if tried again; the job is retried
"""


class InferenceError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ValueError, InferenceError):
    """The models file, or one entry in it, is invalid."""


class UnknownModel(KeyError, InferenceError):
    """No model of that name is configured or served."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


class InvalidInput(ValueError, InferenceError):
    """A job's input cannot be preprocessed (not an image, wrong type, too large)."""


class TransientError(InferenceError):
    """A failure that may pass on another try (device out of memory, a lost connection)."""
