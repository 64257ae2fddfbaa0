"""One exception type for every mistake a user can make.

The CLI turns a GptlabError into a single ``error: ...`` line and exit status 2, so bad input never
shows a traceback. Library code raises it whenever the cause is the caller's input (a path, a file's
content, a flag), and lets genuine bugs raise whatever they raise.
"""


class GptlabError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
