"""The one exception type users see.

Anything raised as :class:`ConversionError` is printed by the CLI as a single line (no traceback
unless ``--debug``) and exits non-zero. Raise it with a message that says what is wrong and where:
file, key, expected vs found.
"""


class ConversionError(Exception):
    exit_code = 2
