"""The one base class for every input error edkit raises."""


class EdkitError(ValueError):
    """Bad input: a file, a field or an argument edkit cannot use.

    Messages name the source (file and line where there is one), the field, the bad value and
    what was expected.
    """
