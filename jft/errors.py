"""The one exception type for mistakes a user can fix: the command line turns it into exit code 2."""


class UserError(Exception):
  """A problem in the user's config, data or work directory; the message names it and the fix."""
