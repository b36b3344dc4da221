"""Errors a user can act on.

Every failure caused by the user's input (recipe, data, model folder, run directory) is a
`WinnowError`: the CLI prints its one-line message and exits with status 2, leaving no
half-written output behind (outputs are written under temporary names and renamed).
"""


class WinnowError(Exception):
    """An error in the user's input: the message names the file, column or key and what was expected."""

    exit_code = 2
