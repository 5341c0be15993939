"""The one base class for mistakes a user can fix (bad config, data, paths): the CLI prints them as one line."""


class UserError(ValueError):
    """Raised with a message that names the file, key or value and what to do."""
