"""User-facing errors: each says where (file, line or key), what was wrong and what to do."""


class TuneforgeError(Exception):
    """An error meant for the user; the CLI prints it without a traceback."""


class ConfigError(TuneforgeError):
    pass


class DataError(TuneforgeError):
    pass


class ModelError(TuneforgeError):
    pass


class TrainingError(TuneforgeError):
    pass
