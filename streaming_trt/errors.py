"""Errors whose message is meant for the user: the CLIs print them and exit with status 2."""


class UserError(Exception):
    """Bad input (arguments, files, settings); the message says what to change."""


class CheckpointError(UserError):
    """A model directory that is missing, corrupt, or does not match its config."""


class UnsupportedModelError(UserError):
    """A model type or setting this library does not implement."""
