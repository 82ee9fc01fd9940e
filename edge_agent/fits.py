"""FITS metadata and CHECKSUM/DATASUM verification, in the same single read pass as the hashes.

A `FitsScan` is one more consumer of the chunks that `hashing.read_chunks` yields: it is
fed the file's bytes in order, in pieces of any size (a header card or a 2880-byte block
may be split anywhere), and never looks back. Memory stays flat whatever the file size:
at most one 2880-byte header block, the keywords of the header being parsed, and one
small record per HDU. Data units are streamed, never buffered.

What it does per HDU (Header and Data Unit):

* parses the header (80-character cards in 2880-byte blocks, up to END): string values
  ('...' with '' as an escaped quote), integers, floats (E or D exponent), logicals T/F;
  HIERARCH keywords (stored without the HIERARCH prefix) and long strings continued
  with CONTINUE cards (the '&' convention) are understood too;
* computes the size of the data unit from BITPIX, NAXIS, NAXISn, PCOUNT and GCOUNT
  (FITS standard 4.0, section 4.4.1: |BITPIX| x GCOUNT x (PCOUNT + NAXIS1 x ... x NAXISn)
  bits, random groups skipping NAXIS1 = 0, padded to a multiple of 2880 bytes). A binary
  table's heap and a tile-compressed image (ZIMAGE, a BINTABLE) are covered by PCOUNT;
* computes the 32-bit ones'-complement sum of the header and of the (padded) data unit,
  as big-endian unsigned 32-bit words, and checks the checksum convention (FITS standard
  4.0, appendix J): DATASUM must equal the data unit's sum, and the sum of the whole HDU,
  the CHECKSUM card included, must be -0 (0xFFFFFFFF).

The ones'-complement sum of many words is the plain sum folded with end-around carry,
which only depends on the sum modulo 2**32 - 1 (2**32 = 1 there). So each chunk is summed
in bulk: with numpy when it is installed (about 7 GiB/s here, the GIL released), else with
Python's big integers: the big-endian integer of a 4-byte-aligned run of bytes is
congruent to the sum of its 32-bit words, so the run is cut into 64 KiB slices, each
turned into one integer with `int.from_bytes`, and the integers are added and folded
(0.7-0.9 GiB/s on one core, holding the GIL; no Python loop per word).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

try:  # optional: the 'fits' extra (astropy) brings it
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the environment
    _np = None

BLOCK = 2880
CARD = 80
# A header this long is not a header: give up rather than keep its keywords in memory.
MAX_HEADER_BLOCKS = 10_000

Value = str | int | float | bool

_M32 = 0xFFFFFFFF
_SLICE = 64 * 1024          # int.from_bytes is fastest on slices that stay in the CPU cache
_NUMPY_SLICE = 1 << 30      # 2**28 words below 2**32 each: their uint64 sum cannot overflow
_VALID_BITPIX = (8, 16, 32, 64, -32, -64)
_PRIMARY_MAGIC = b"SIMPLE  ="
_EXTENSION_MAGIC = b"XTENSION"
# Extension keywords that are always kept (they name the HDU).
_ALWAYS_KEPT = ("XTENSION", "EXTNAME", "EXTVER")


def looks_like_fits(first_bytes: bytes | bytearray | memoryview) -> bool:
    """True when the bytes start like a FITS file: the card 'SIMPLE  =' at the very start."""
    return bytes(first_bytes[:len(_PRIMARY_MAGIC)]) == _PRIMARY_MAGIC


# --------------------------------------------------------------------------- ones' complement


def _fold(x: int) -> int:
    """Reduce a non-negative integer to a 32-bit ones'-complement value (end-around carry).

    The result is congruent to x modulo 2**32 - 1 and lies in [1, 0xFFFFFFFF] for any
    x > 0 (a non-zero multiple of 2**32 - 1 gives 0xFFFFFFFF, the "-0"), 0 only for x = 0.
    """
    while x >> 64:
        # halve the width: 2**k = 1 modulo 2**32 - 1 when k is a multiple of 32
        k = ((x.bit_length() + 63) >> 6) << 5
        x = (x >> k) + (x & ((1 << k) - 1))
    while x >> 32:
        x = (x >> 32) + (x & _M32)
    return x


def _words_sum_python(mv: memoryview) -> int:
    """An integer congruent to the sum of the big-endian 32-bit words of mv modulo 2**32 - 1
    (zero only if every byte is zero). len(mv) must be a multiple of 4."""
    n = len(mv)
    if n <= _SLICE:
        return int.from_bytes(mv, "big")
    return sum(map(int.from_bytes, [mv[i:i + _SLICE] for i in range(0, n, _SLICE)]))


def _words_sum_numpy(mv: memoryview) -> int:
    """The plain sum of the big-endian 32-bit words of mv. len(mv) must be a multiple of 4."""
    n = len(mv)
    if n < 4096:  # numpy's per-call overhead does not pay off on a card or a block
        return int.from_bytes(mv, "big")
    total = 0
    for i in range(0, n, _NUMPY_SLICE):
        words = _np.frombuffer(mv[i:i + _NUMPY_SLICE], dtype=">u4")
        total += int(_np.add.reduce(words, dtype=_np.uint64))
    return total


SUM_BACKEND = "numpy" if _np is not None else "python"
_words_sum = _words_sum_numpy if _np is not None else _words_sum_python


def ones_complement_sum(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """32-bit ones'-complement sum of data (big-endian words; len(data) a multiple of 4),
    continued from `start`."""
    mv = _as_bytes_view(data)
    if len(mv) % 4:
        raise ValueError("length must be a multiple of 4")
    return _fold(start + _words_sum(mv))


class _OnesSum:
    """Running ones'-complement sum over a byte stream fed in pieces of any length."""

    __slots__ = ("_tail", "value")

    def __init__(self) -> None:
        self.value = 0
        self._tail = b""        # 0-3 bytes of a word split across two pieces

    def update(self, mv: memoryview) -> None:
        if self._tail:
            need = 4 - len(self._tail)
            self._tail += bytes(mv[:need])
            mv = mv[need:]
            if len(self._tail) < 4:
                return
            self.value = _fold(self.value + int.from_bytes(self._tail, "big"))
            self._tail = b""
        n = len(mv) & ~3
        if n:
            self.value = _fold(self.value + _words_sum(mv[:n]))
        if n < len(mv):
            self._tail = bytes(mv[n:])


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


# --------------------------------------------------------------------------- header cards


def _parse_string(text: str) -> tuple[str, bool]:
    """Parse a quoted FITS string starting at the first quote of text.

    Returns the value ('' unescaped, trailing blanks dropped as the standard says they
    are not significant) and whether the closing quote was found.
    """
    start = text.find("'")
    if start < 0:
        return "", False
    parts = []
    i = start + 1
    while True:
        q = text.find("'", i)
        if q < 0:
            parts.append(text[i:])
            return "".join(parts).rstrip(), False
        parts.append(text[i:q])
        if text.startswith("'", q + 1):   # '' is an escaped quote
            parts.append("'")
            i = q + 2
        else:
            return "".join(parts).rstrip(), True


def parse_value(text: str) -> Value | None:
    """Parse the value field of a card (what follows '= '); None when undefined (blank)."""
    s = text.lstrip()
    if not s:
        return None
    if s[0] == "'":
        return _parse_string(s)[0]
    v = s.split("/", 1)[0].strip()
    if not v:
        return None
    if v == "T":
        return True
    if v == "F":
        return False
    if "_" not in v:            # Python accepts 1_000, FITS does not
        try:
            return int(v)
        except ValueError:
            pass
        try:
            return float(v.replace("D", "E").replace("d", "e"))
        except ValueError:
            pass
    return v                    # complex values and anything non-standard: the raw text


def _hierarch_key(name: str) -> str:
    name = " ".join(name.split()).upper()
    name = name.removeprefix("HIERARCH ")
    return name


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class HduCheck:
    """What the scan found about one HDU."""

    index: int
    offset: int                      # byte offset of the header in the file
    header_size: int                 # bytes, a multiple of 2880
    data_size: int                   # bytes declared by the header, without the padding
    xtension: str | None             # None for the primary HDU, else 'IMAGE', 'BINTABLE', ...
    extname: str | None
    has_checksum: bool
    has_datasum: bool
    checksum_ok: bool | None         # None: no CHECKSUM card, or the HDU is incomplete
    datasum_ok: bool | None          # None: no DATASUM card, or the HDU is incomplete
    datasum: str | None = None       # the DATASUM value as written
    computed_datasum: int | None = None
    complete: bool = True            # False: the file ends inside this HDU's data unit
    header: dict[str, Value] = field(default_factory=dict, compare=True)

    @property
    def padded_data_size(self) -> int:
        return -(-self.data_size // BLOCK) * BLOCK

    @property
    def label(self) -> str:
        return f"HDU {self.index} ({self.extname})" if self.extname else f"HDU {self.index}"


@dataclass
class FitsResult:
    """The outcome of a scan. `header` holds the primary header's keywords."""

    is_fits: bool
    truncated: bool = False
    hdus: list[HduCheck] = field(default_factory=list)
    header: dict[str, Value] = field(default_factory=dict)
    size: int = 0                    # bytes consumed
    truncation: str | None = None    # why the file is truncated, e.g. 'HDU 2 needs 5760 more bytes'
    error: str | None = None         # a header that made the scan stop (invalid structure)
    trailing_bytes: int = 0          # bytes after the last HDU that do not start an extension

    def metadata(self, keywords: Iterable[str], hdu: int | str = 0) -> dict[str, Value]:
        """The requested keywords that the header has, keyed by their FITS (upper-case) name.

        Case-insensitive; missing keywords are left out. `hdu` is an index or an EXTNAME;
        extension headers only hold the keywords the scan was asked to keep.
        """
        if hdu == 0:
            source = self.header
        else:
            source = {}
            for h in self.hdus:
                if h.index == hdu or (isinstance(hdu, str) and h.extname is not None
                                      and h.extname.upper() == hdu.upper()):
                    source = h.header
                    break
        out: dict[str, Value] = {}
        for kw in keywords:
            key = _hierarch_key(kw)
            if key in source:
                out[key] = source[key]
        return out

    def problems(self, tolerate_trailing: bool = False) -> list[str]:
        """Human-readable integrity problems; empty for a sound FITS file and for non-FITS files.
        `tolerate_trailing`: bytes after the last HDU that do not start an extension (padding some
        writers leave) are not a problem."""
        if not self.is_fits:
            return []
        out = []
        for h in self.hdus:
            if h.datasum_ok is False:
                if h.computed_datasum is not None and _parse_datasum(h.datasum) is None:
                    out.append(f"{h.label}: DATASUM {h.datasum!r} is not a number")
                else:
                    out.append(f"{h.label}: DATASUM {h.datasum} != computed {h.computed_datasum} (data corrupt)")
            if h.checksum_ok is False:
                if h.datasum_ok:
                    out.append(f"{h.label}: CHECKSUM does not verify (header corrupt: the data match DATASUM)")
                else:
                    out.append(f"{h.label}: CHECKSUM does not verify (header or data corrupt)")
        if self.error:
            out.append(self.error)
        if self.truncated:
            out.append(f"file is truncated: {self.truncation}")
        if self.trailing_bytes and not tolerate_trailing:
            last = self.hdus[-1].index if self.hdus else 0
            out.append(f"{self.trailing_bytes} bytes after HDU {last} do not start a FITS extension")
        return out

    @property
    def ok(self) -> bool:
        """A FITS file with no problem (checks that are absent count as passed)."""
        return self.is_fits and not self.problems()


def _parse_datasum(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n >= 0 else None


# --------------------------------------------------------------------------- the scan

_HEADER, _DATA, _TRAILING, _NOT_FITS, _INVALID = range(5)


class FitsScan:
    """Incremental FITS scanner: feed it the whole file with `update`, then ask `result`.

    `extension_keywords`: keywords to keep from extension headers besides XTENSION,
    EXTNAME and EXTVER ("*" keeps them all). The primary header is always kept whole.
    """

    def __init__(self, extension_keywords: Iterable[str] = ()) -> None:
        self._extension_keywords = tuple(extension_keywords)
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far (the file is being read again from its start)."""
        keep = {_hierarch_key(k) for k in self._extension_keywords}
        self._keep_all = "*" in keep
        self._keep = keep | set(_ALWAYS_KEPT)
        self._state = _HEADER
        self._size = 0
        self._is_fits = False
        self._hdus: list[HduCheck] = []
        self._primary: dict[str, Value] = {}
        self._error: str | None = None
        self._trailing = 0
        self._new_hdu(0, 0)

    # -- per-HDU state

    def _new_hdu(self, index: int, offset: int) -> None:
        self._index = index
        self._offset = offset
        self._block = bytearray()
        self._start_checked = False
        self._header_blocks = 0
        self._header_sum = 0
        self._cards: dict[str, Value] = {}
        self._continued: str | None = None   # keyword whose string value goes on in CONTINUE cards
        self._data_sum = _OnesSum()
        self._data_size = 0
        self._data_remaining = 0

    # -- feeding

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        mv = _as_bytes_view(chunk)
        self._size += len(mv)
        while mv:
            state = self._state
            if state == _DATA:
                take = min(len(mv), self._data_remaining)
                self._data_sum.update(mv[:take])
                self._data_remaining -= take
                mv = mv[take:]
                if not self._data_remaining:
                    self._end_hdu()
            elif state == _HEADER:
                take = min(len(mv), BLOCK - len(self._block))
                self._block += mv[:take]
                mv = mv[take:]
                if not self._start_checked and not self._check_start():
                    continue
                if len(self._block) == BLOCK:
                    self._header_block()
            elif state == _TRAILING:
                self._trailing += len(mv)
                return
            else:  # not FITS, or a header we cannot go past: just count the bytes
                return

    def _check_start(self) -> bool:
        """Decide, as soon as enough bytes are there, whether an HDU starts here.

        Returns False when the state changed (not FITS, or trailing bytes)."""
        magic = _PRIMARY_MAGIC if self._index == 0 else _EXTENSION_MAGIC
        if len(self._block) < len(magic):
            return True
        self._start_checked = True
        if self._block[:len(magic)] == magic:
            self._is_fits = True
            return True
        if self._index == 0:
            self._state = _NOT_FITS
        else:
            self._state = _TRAILING
            self._trailing = len(self._block)
        self._block = bytearray()
        return False

    def _header_block(self) -> None:
        block = bytes(self._block)
        self._block = bytearray()
        self._header_blocks += 1
        self._header_sum = _fold(self._header_sum + _words_sum(memoryview(block)))
        text = block.decode("latin-1")
        for i in range(0, BLOCK, CARD):
            card = text[i:i + CARD]
            if card[:8].rstrip() == "END":
                self._end_header()
                return
            self._card(card)
        if self._header_blocks >= MAX_HEADER_BLOCKS:
            self._invalid(f"no END card in the first {MAX_HEADER_BLOCKS * BLOCK} bytes of the header")

    def _card(self, card: str) -> None:
        key = card[:8].rstrip().upper()
        if key == "CONTINUE":
            if self._continued is not None:
                more, _ = _parse_string(card[8:])
                joined = str(self._cards[self._continued])[:-1] + more
                self._cards[self._continued] = joined
                if not joined.endswith("&"):
                    self._continued = None
            return
        self._continued = None
        if key == "HIERARCH":
            eq = card.find("=", 8)
            if eq < 0:
                return
            key = _hierarch_key(card[8:eq])
            raw = card[eq + 1:]
        elif card[8:9] == "=":
            raw = card[9:]
        else:
            return              # COMMENT, HISTORY, blank and other commentary cards
        if not key or key in self._cards:   # the first occurrence wins
            return
        value = parse_value(raw)
        if value is None:
            return
        self._cards[key] = value
        if isinstance(value, str) and value.endswith("&") and raw.lstrip().startswith("'"):
            self._continued = key

    def _end_header(self) -> None:
        size, err = self._data_unit_size()
        if err is not None:
            self._invalid(err)
            return
        if self._index == 0:
            self._primary = self._cards
        self._data_size = size
        self._data_remaining = -(-size // BLOCK) * BLOCK
        if self._data_remaining:
            self._state = _DATA
        else:
            self._end_hdu()

    def _invalid(self, why: str) -> None:
        label = self._label()
        self._error = f"{label}: invalid header: {why}"
        if self._index == 0:
            self._primary = self._cards
        self._state = _INVALID
        self._block = bytearray()

    def _label(self) -> str:
        name = self._cards.get("EXTNAME")
        return f"HDU {self._index} ({name})" if isinstance(name, str) and name else f"HDU {self._index}"

    def _data_unit_size(self) -> tuple[int, str | None]:
        h = self._cards

        def integer(key: str, default: int | None = None) -> int:
            v = h.get(key, default)
            if v is None:
                raise _HeaderError(f"{key} is missing")
            if type(v) is not int or v < 0:
                raise _HeaderError(f"{key} = {v!r} is not a non-negative integer")
            return v

        try:
            bitpix = h.get("BITPIX")
            if bitpix is None:
                raise _HeaderError("BITPIX is missing")
            if type(bitpix) is not int or bitpix not in _VALID_BITPIX:
                raise _HeaderError(f"BITPIX = {bitpix!r} is not one of {_VALID_BITPIX}")
            naxis = integer("NAXIS")
            if naxis > 999:
                raise _HeaderError(f"NAXIS = {naxis} is above 999")
            axes = [integer(f"NAXIS{n}") for n in range(1, naxis + 1)]
            if not axes:
                return 0, None
            groups = self._index == 0 and h.get("GROUPS") is True and axes[0] == 0
            if self._index == 0 and not groups:
                pcount, gcount = 0, 1
            else:
                pcount, gcount = integer("PCOUNT", 0), integer("GCOUNT", 1)
            count = 1
            for n in axes[1:] if groups else axes:
                count *= n
            bits = abs(bitpix) * gcount * (pcount + count)
            return bits // 8, None
        except _HeaderError as e:
            return 0, str(e)

    def _end_hdu(self) -> None:
        self._hdus.append(self._check(complete=True))
        offset = self._offset + self._header_blocks * BLOCK + -(-self._data_size // BLOCK) * BLOCK
        self._new_hdu(self._index + 1, offset)
        self._state = _HEADER

    def _check(self, complete: bool) -> HduCheck:
        h = self._cards
        checksum = h.get("CHECKSUM")
        datasum = h.get("DATASUM")
        datasum_text = None if datasum is None or isinstance(datasum, bool) else str(datasum).strip()
        checksum_ok = datasum_ok = computed = None
        if complete:
            computed = self._data_sum.value
            if checksum is not None:
                checksum_ok = _fold(self._header_sum + self._data_sum.value) == _M32
            if datasum is not None:
                datasum_ok = _parse_datasum(datasum_text) == computed
        xtension = h.get("XTENSION") if self._index else None
        extname = h.get("EXTNAME")
        if self._index == 0:
            kept = h
        elif self._keep_all:
            kept = dict(h)
        else:
            kept = {k: v for k, v in h.items() if k in self._keep}
        return HduCheck(
            index=self._index,
            offset=self._offset,
            header_size=self._header_blocks * BLOCK,
            data_size=self._data_size,
            xtension=str(xtension).strip() if xtension is not None else None,
            extname=str(extname).strip() if extname is not None else None,
            has_checksum=checksum is not None,
            has_datasum=datasum is not None,
            checksum_ok=checksum_ok,
            datasum_ok=datasum_ok,
            datasum=datasum_text,
            computed_datasum=computed,
            complete=complete,
            header=kept,
        )

    # -- the outcome

    def result(self) -> FitsResult:
        """The outcome so far; at the end of the file, the outcome. Does not change the scan."""
        res = FitsResult(is_fits=self._is_fits, hdus=list(self._hdus), header=self._primary,
                         size=self._size, error=self._error, trailing_bytes=self._trailing)
        if not self._is_fits:
            res.header = {}
            return res
        if self._state == _DATA:
            res.hdus.append(self._check(complete=False))
            padding = -(-self._data_size // BLOCK) * BLOCK - self._data_size
            why = f"HDU {self._index} needs {self._data_remaining} more bytes"
            if self._data_remaining <= padding:
                why += " (only the padding of its last block is missing)"
            res.truncated, res.truncation = True, why
        elif self._state == _HEADER and (self._block or self._header_blocks):
            if not self._start_checked and _EXTENSION_MAGIC[:len(self._block)] != self._block:
                res.trailing_bytes = len(self._block)        # a few bytes that start nothing
            else:
                seen = self._header_blocks * BLOCK + len(self._block)
                res.truncated = True
                res.truncation = f"HDU {self._index} header is incomplete (no END card in its {seen} bytes)"
                if self._index == 0:
                    res.header = self._cards
        return res

    @property
    def size(self) -> int:
        return self._size


class _HeaderError(Exception):
    pass


def scan_bytes(data: bytes | bytearray | memoryview, extension_keywords: Iterable[str] = ()) -> FitsResult:
    """Scan an in-memory FITS file (convenience for tests and small files)."""
    scan = FitsScan(extension_keywords)
    scan.update(data)
    return scan.result()


__all__ = [
    "BLOCK",
    "SUM_BACKEND",
    "FitsResult",
    "FitsScan",
    "HduCheck",
    "Value",
    "looks_like_fits",
    "ones_complement_sum",
    "parse_value",
    "scan_bytes",
]
