"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ProducerError(Exception):
    """A user-facing failure (bad file, bad option, no consumer); the message names the thing."""
