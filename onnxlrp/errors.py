"""The one exception type of onnxlrp: the CLI turns it into a single line on stderr."""
import unicodedata


class LrpError(Exception):
    """A problem with the user's model, composite or options, worded for the user."""


class LrpWarning(UserWarning):
    """Something the user should know that does not stop the work (one line; the command prints it on stderr)."""


def printable(text: str) -> str:
    """`text` with control characters, terminal escape sequences and invisible format characters escaped
    (`\\x1b`, `\\n`, `\\u202e`), so that names from a model cannot move the cursor or recolour the terminal."""
    return "".join(_escape(c) if _hidden(c) else c for c in text)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _hidden(character: str) -> bool:
    return unicodedata.category(character) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


def _escape(character: str) -> str:
    if character in _ESCAPES:
        return _ESCAPES[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
