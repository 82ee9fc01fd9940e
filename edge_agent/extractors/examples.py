"""Two small plug-ins to copy from, one of each form. Not registered by this package: a site
registers what it uses (docs/configuration.md, `[rules.NAME.extractor]`); the tests register these."""

from __future__ import annotations


class LineCount:
    """Takes the stream: counts the file's bytes and newlines in the hashing read itself."""

    @classmethod
    def stream(cls, path: str, size: int) -> LineCount:
        """A fresh counter for the file at `path` (`size` bytes when the read starts)."""
        return cls()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start over: the read begins again."""
        self.lines = 0
        self.nbytes = 0

    def update(self, chunk: bytes | memoryview) -> None:
        """Count one more chunk."""
        self.lines += bytes(chunk).count(b"\n")
        self.nbytes += len(chunk)

    def result(self) -> dict[str, int]:
        """{"lines": newlines, "bytes_counted": bytes fed}."""
        return {"lines": self.lines, "bytes_counted": self.nbytes}


class FirstLine:
    """Reads the file itself (a second read, of one line only): its first line as `first_line`."""

    @staticmethod
    def extract(path: str) -> dict[str, str]:
        """{"first_line": the first line, without its end, at most 200 characters}."""
        with open(path, "rb") as fh:
            line = fh.readline(800)
        return {"first_line": line.decode("utf-8", "replace").rstrip("\r\n")[:200]}
