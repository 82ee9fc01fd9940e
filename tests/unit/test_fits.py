"""FITS scan: header keywords and CHECKSUM/DATASUM verification in one incremental pass.

The files are made here by a small FITS writer whose CHECKSUM/DATASUM come from a plain,
word-by-word ones'-complement sum (independent of the bulk arithmetic in edge_agent.fits).
When astropy is installed, files written by astropy are checked as well, and astropy
checks the files of the writer here.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from edge_agent import fits
from edge_agent.fits import FitsResult, FitsScan, looks_like_fits, ones_complement_sum, parse_value
from edge_agent.hashing import read_chunks

M = 0xFFFFFFFF
BLOCK = 2880


# --------------------------------------------------------------------------- reference arithmetic


def ref_sum(data: bytes) -> int:
    """Ones'-complement sum, one 32-bit big-endian word at a time (slow and obvious)."""
    assert len(data) % 4 == 0
    s = 0
    for (w,) in struct.iter_unpack(">I", data):
        s += w
        if s > M:
            s = (s & M) + 1
    return s


def ref_sum_array(data: bytes) -> int:
    """Same sum for large buffers: plain sum of the words, then end-around carries."""
    words = array("I")
    assert words.itemsize == 4
    words.frombytes(data)
    if sys.byteorder == "little":
        words.byteswap()
    s = sum(words)
    while s > M:
        s = (s & M) + (s >> 32)
    return s


def ones_add(a: int, b: int) -> int:
    s = a + b
    return (s & M) + 1 if s > M else s


def encode_checksum(value: int) -> str:
    """The 16-character encoding of appendix J of the FITS standard (value already complemented)."""
    excluded = set(range(0x3A, 0x41)) | set(range(0x5B, 0x61))
    asc = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        ch = [byte // 4 + 0x30] * 4
        ch[0] += byte % 4
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                if ch[j] in excluded or ch[j + 1] in excluded:
                    ch[j] += 1
                    ch[j + 1] -= 1
                    changed = True
        for j in range(4):
            asc[4 * j + i] = ch[j]
    # the value starts at byte 11 of its card, i.e. at the last byte of a 32-bit word
    return bytes(asc[-1:] + asc[:-1]).decode("ascii")


# --------------------------------------------------------------------------- a tiny FITS writer


def card(key: str, value: object = None, comment: str | None = None, raw: str | None = None) -> bytes:
    if raw is not None:
        text = f"{key:<8}= {raw:>20}"
    elif value is None:
        text = key
    elif isinstance(value, bool):
        text = f"{key:<8}= {'T' if value else 'F':>20}"
    elif isinstance(value, int):
        text = f"{key:<8}= {value:>20}"
    elif isinstance(value, float):
        text = f"{key:<8}= {repr(value).upper():>20}"
    else:
        quoted = "'" + str(value).replace("'", "''").ljust(8) + "'"
        text = f"{key:<8}= {quoted:<20}"
    if comment:
        text += f" / {comment}"
    assert len(text) <= 80, text
    return text.ljust(80).encode("ascii")


def pad(data: bytes, fill: bytes = b"\0") -> bytes:
    return data + fill * (-len(data) % BLOCK)


def make_hdu(cards: list[bytes], data: bytes = b"", checksum: bool = True) -> bytes:
    data = pad(data)
    if not checksum:
        return pad(b"".join(cards) + card("END"), b" ") + data
    datasum = ref_sum(data)
    cards = [*cards, card("CHECKSUM", "0" * 16, "HDU checksum"), card("DATASUM", str(datasum), "data unit checksum")]
    header = pad(b"".join(cards) + card("END"), b" ")
    total = ones_add(ref_sum(header), datasum)
    placeholder = b"'" + b"0" * 16 + b"'"
    assert header.count(placeholder) == 1
    header = header.replace(placeholder, b"'" + encode_checksum(~total & M).encode() + b"'")
    return header + data


def rnd(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def primary_hdu(checksum: bool = True) -> bytes:
    cards = [
        card("SIMPLE", True), card("BITPIX", 16), card("NAXIS", 2), card("NAXIS1", 30), card("NAXIS2", 20),
        card("EXTEND", True),
        card("OBJECT", "M31 'core'", "a quote inside"),
        card("OBSERVER", "  Ada   "),
        card("EXPTIME", 30.5, "seconds"),
        card("NEXP", 4), card("TEMP", -12),
        card("GAIN", raw="2.5D-01"), card("BIG", raw="-1.25E+03"),
        card("FLAG", True), card("DONE", False),
        card("DATE-OBS", "2024-05-01T12:00:00"),
        card("EMPTY", raw=""),
        card("LONGSTR", "part one &"), card("CONTINUE  'and part two&'"), card("CONTINUE  '.'"),
        b"HIERARCH ESO DET DIT = 1.5 / hierarch keyword".ljust(80),
        card("COMMENT   a commentary card = that is not a value"),
        card("HISTORY   written by the test"),
        card("NEXP", 99, "a duplicate: the first one wins"),
    ]
    data = b"".join(struct.pack(">h", (i * 37) % 65536 - 32768) for i in range(30 * 20))
    return make_hdu(cards, data, checksum)


def image_ext(checksum: bool = True) -> bytes:
    cards = [
        card("XTENSION", "IMAGE"), card("BITPIX", -32), card("NAXIS", 2), card("NAXIS1", 50), card("NAXIS2", 40),
        card("PCOUNT", 0), card("GCOUNT", 1), card("EXTNAME", "SCI"), card("BUNIT", "adu"),
    ]
    data = b"".join(struct.pack(">f", (i % 97) * 0.5 - 3) for i in range(50 * 40))
    return make_hdu(cards, data, checksum)


def bintable_ext(checksum: bool = True) -> bytes:
    # rows of 16 bytes (a 1PB descriptor + one double) and a 1000-byte heap: PCOUNT counts the heap
    cards = [
        card("XTENSION", "BINTABLE"), card("BITPIX", 8), card("NAXIS", 2), card("NAXIS1", 16), card("NAXIS2", 100),
        card("PCOUNT", 1000), card("GCOUNT", 1), card("TFIELDS", 2),
        card("TTYPE1", "WAVE"), card("TFORM1", "1PB(100)"), card("TTYPE2", "TIME"), card("TFORM2", "1D"),
        card("EXTNAME", "EVENTS"),
        card("COMMENT   this header has a comment to flip"),
    ]
    return make_hdu(cards, rnd(2, 16 * 100 + 1000), checksum)


def sample_file(checksum: bool = True) -> bytes:
    return primary_hdu(checksum) + image_ext(checksum) + bintable_ext(checksum)


def scan(data: bytes, chunk: int | None = None, **kw: object) -> FitsResult:
    s = FitsScan(**kw)  # type: ignore[arg-type]
    if chunk is None:
        s.update(data)
    else:
        for i in range(0, len(data), chunk):
            s.update(data[i:i + chunk])
    return s.result()


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


# --------------------------------------------------------------------------- the writer itself


def test_reference_writer_makes_hdus_that_sum_to_minus_zero() -> None:
    for hdu in (primary_hdu(), image_ext(), bintable_ext()):
        assert len(hdu) % BLOCK == 0
        assert ref_sum(hdu) == M


def test_checksum_encoding_round_trips() -> None:
    # the 16 characters, read back as 4 words, sum to the encoded value plus the four '0000' words
    for v in (1, 0x12345678, 0x80000000, 0xFFFFFFFE, 0xDEADBEEF):
        enc = encode_checksum(v)
        assert len(enc) == 16 and enc.isalnum()
        words = (enc[1:] + enc[0]).encode()
        assert ones_add(ref_sum(words), ~0xC0C0C0C0 & M) == v


# --------------------------------------------------------------------------- sums


def test_ones_complement_sum_basics() -> None:
    assert ones_complement_sum(b"") == 0
    assert ones_complement_sum(b"\0" * 4096) == 0
    assert ones_complement_sum(b"\xff" * 8) == M                     # -0 + -0
    assert ones_complement_sum(b"\x80\0\0\0" * 2) == 1               # end-around carry
    assert ones_complement_sum(b"\xff\xff\xff\xfe\0\0\0\x01") == M    # -1 + 1 = -0, never +0
    assert ones_complement_sum(b"\0\0\0\x05", start=7) == 12
    with pytest.raises(ValueError):
        ones_complement_sum(b"abc")


@pytest.mark.parametrize("n", [4, 80, 2880, 65536, 65540, 3 * 65536 + 12, 1 << 20])
def test_bulk_sum_matches_word_by_word(n: int) -> None:
    data = rnd(n, n)
    assert ones_complement_sum(data) == ref_sum_array(data)
    assert ones_complement_sum(b"\xff" * n) == M


def test_python_and_numpy_backends_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    data = rnd(7, 5 * 65536 + 40)
    expected = ref_sum_array(data)
    monkeypatch.setattr(fits, "_words_sum", fits._words_sum_python)
    assert ones_complement_sum(data) == expected
    assert scan(sample_file(), chunk=7).ok
    if fits._np is None:
        pytest.skip("numpy is not installed: only the pure-Python backend exists")
    monkeypatch.setattr(fits, "_words_sum", fits._words_sum_numpy)
    assert ones_complement_sum(data) == expected
    assert scan(sample_file(), chunk=7).ok


# --------------------------------------------------------------------------- sound files


def test_looks_like_fits() -> None:
    assert looks_like_fits(sample_file()[:BLOCK])
    assert looks_like_fits(memoryview(b"SIMPLE  =                    T"))
    assert not looks_like_fits(b"SIMPLE =")
    assert not looks_like_fits(b"")
    assert not looks_like_fits(b"XTENSION= 'IMAGE   '")
    assert not looks_like_fits(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)


def test_valid_file_verifies_every_hdu() -> None:
    data = sample_file()
    res = scan(data)
    assert res.is_fits and not res.truncated and res.error is None
    assert res.problems() == [] and res.ok
    assert res.size == len(data)
    assert [(h.index, h.xtension, h.extname) for h in res.hdus] == [
        (0, None, None), (1, "IMAGE", "SCI"), (2, "BINTABLE", "EVENTS")]
    for h in res.hdus:
        assert h.has_checksum and h.has_datasum and h.complete
        assert h.checksum_ok is True and h.datasum_ok is True
        assert h.computed_datasum == int(h.datasum or "")
    assert [h.data_size for h in res.hdus] == [30 * 20 * 2, 50 * 40 * 4, 16 * 100 + 1000]
    assert [h.offset for h in res.hdus] == [0, BLOCK * 2, BLOCK * 6]
    assert sum(h.header_size + h.padded_data_size for h in res.hdus) == len(data)


def test_file_without_checksums_has_nothing_to_verify() -> None:
    res = scan(sample_file(checksum=False))
    assert res.ok and len(res.hdus) == 3
    for h in res.hdus:
        assert not h.has_checksum and not h.has_datasum
        assert h.checksum_ok is None and h.datasum_ok is None
        assert h.computed_datasum is not None


@pytest.mark.parametrize("chunk", [1, 7, 2880, 1 << 20])
def test_result_does_not_depend_on_chunk_size(chunk: int) -> None:
    data = sample_file()
    assert scan(data, chunk) == scan(data)
    bad = flip(data, BLOCK * 2 + BLOCK + 123)
    assert scan(bad, chunk) == scan(bad)
    cut = data[:-4000]
    assert scan(cut, chunk) == scan(cut)


def test_fed_through_read_chunks_reusing_one_buffer(tmp_path: Path) -> None:
    data = sample_file()
    path = tmp_path / "obs.fits"
    path.write_bytes(data)
    s = FitsScan()
    with open(path, "rb", buffering=0) as fh:
        for chunk in read_chunks(fh, chunk_size=1001):      # the buffer is overwritten under the scan
            s.update(chunk)
    assert s.result() == scan(data)
    assert s.result().ok


def test_large_data_unit_streams() -> None:
    n = 3 * 1024 * 1024 + 4 * 123
    cards = [card("SIMPLE", True), card("BITPIX", 32), card("NAXIS", 1), card("NAXIS1", n // 4)]
    payload = rnd(11, n)
    datasum = ref_sum_array(pad(payload))
    header = pad(b"".join([*cards, card("DATASUM", str(datasum)), card("END")]), b" ")
    data = header + pad(payload)
    for chunk in (1 << 20, 1_000_003, 8 << 20):
        res = scan(data, chunk)
        assert res.ok, res.problems()
        assert res.hdus[0].datasum_ok is True and res.hdus[0].computed_datasum == datasum


def test_minus_zero_and_zero_datasums() -> None:
    ones = make_hdu([card("SIMPLE", True), card("BITPIX", 8), card("NAXIS", 1), card("NAXIS1", 2880)], b"\xff" * 2880)
    res = scan(ones)
    assert res.ok and res.hdus[0].computed_datasum == M
    zeros = make_hdu([card("SIMPLE", True), card("BITPIX", 8), card("NAXIS", 1), card("NAXIS1", 100)], b"\0" * 100)
    res = scan(zeros)
    assert res.ok and res.hdus[0].computed_datasum == 0 and res.hdus[0].datasum == "0"


def test_primary_without_data() -> None:
    data = make_hdu([card("SIMPLE", True), card("BITPIX", 8), card("NAXIS", 0), card("EXTEND", True)]) + image_ext()
    res = scan(data, 13)
    assert res.ok
    assert [h.data_size for h in res.hdus] == [0, 8000]


def test_random_groups_size() -> None:
    # |BITPIX| * GCOUNT * (PCOUNT + NAXIS2 * NAXIS3) bits: NAXIS1 = 0 is skipped
    cards = [card("SIMPLE", True), card("BITPIX", -32), card("NAXIS", 3), card("NAXIS1", 0), card("NAXIS2", 3),
             card("NAXIS3", 2), card("GROUPS", True), card("PCOUNT", 4), card("GCOUNT", 7)]
    data = make_hdu(cards, rnd(3, 4 * 7 * (4 + 6))) + image_ext()
    res = scan(data, 1000)
    assert res.ok, res.problems()
    assert res.hdus[0].data_size == 4 * 7 * 10
    assert res.hdus[1].extname == "SCI"


def test_tile_compressed_image_is_a_bintable_with_heap() -> None:
    cards = [card("XTENSION", "BINTABLE"), card("BITPIX", 8), card("NAXIS", 2), card("NAXIS1", 8),
             card("NAXIS2", 10), card("PCOUNT", 3000), card("GCOUNT", 1), card("TFIELDS", 1),
             card("TTYPE1", "COMPRESSED_DATA"), card("TFORM1", "1PB(400)"), card("ZIMAGE", True),
             card("ZCMPTYPE", "RICE_1"), card("ZBITPIX", 16), card("ZNAXIS", 2), card("ZNAXIS1", 100),
             card("ZNAXIS2", 10)]
    data = primary_hdu() + make_hdu(cards, rnd(4, 80 + 3000)) + image_ext()
    res = scan(data, 2879, extension_keywords=["ZIMAGE", "zcmptype"])
    assert res.ok, res.problems()
    assert [h.xtension for h in res.hdus] == [None, "BINTABLE", "IMAGE"]
    assert res.hdus[1].data_size == 3080 and res.hdus[1].padded_data_size == 2 * BLOCK
    assert res.metadata(["zimage", "ZCMPTYPE", "ZBITPIX"], hdu=1) == {"ZIMAGE": True, "ZCMPTYPE": "RICE_1"}


# --------------------------------------------------------------------------- corruption


def test_flipped_data_byte_fails_that_hdu_only() -> None:
    data = sample_file()
    hdus = scan(data).hdus
    bad = flip(data, hdus[1].offset + hdus[1].header_size + 1001, 0x40)
    res = scan(bad, 7)
    assert [(h.checksum_ok, h.datasum_ok) for h in res.hdus] == [(True, True), (False, False), (True, True)]
    sci = res.hdus[1]
    assert res.problems() == [
        f"HDU 1 (SCI): DATASUM {sci.datasum} != computed {sci.computed_datasum} (data corrupt)",
        "HDU 1 (SCI): CHECKSUM does not verify (header or data corrupt)",
    ]
    assert not res.ok


def test_flipped_padding_byte_is_caught_too() -> None:
    data = sample_file()
    first = scan(data).hdus[0]
    bad = flip(data, first.header_size + first.padded_data_size - 1)   # the last fill byte of HDU 0
    res = scan(bad)
    assert (res.hdus[0].checksum_ok, res.hdus[0].datasum_ok) == (False, False)
    assert all(h.checksum_ok for h in res.hdus[1:])


def test_flipped_header_byte_fails_checksum_not_datasum() -> None:
    data = sample_file()
    at = data.index(b"this header has a comment to flip")
    bad = flip(data, at, 0x20)                 # 't' -> 'T': still a valid header
    res = scan(bad, 2880)
    assert [(h.checksum_ok, h.datasum_ok) for h in res.hdus] == [(True, True), (True, True), (False, True)]
    assert res.problems() == ["HDU 2 (EVENTS): CHECKSUM does not verify (header corrupt: the data match DATASUM)"]


def test_datasum_that_is_not_a_number() -> None:
    data = sample_file()
    header_end = BLOCK * 2
    first = data[:header_end]
    at = first.index(b"DATASUM = ")
    value = first[at + 10:at + 30]
    bad = data[:at + 10] + b"'abc'".ljust(len(value)) + data[at + 30:]
    res = scan(bad)
    assert res.hdus[0].datasum_ok is False and res.hdus[0].datasum == "abc"
    assert "HDU 0: DATASUM 'abc' is not a number" in res.problems()


# --------------------------------------------------------------------------- not FITS, truncated, trailing


@pytest.mark.parametrize("data", [b"", b"SIMPL", b"hello world\n" * 1000, rnd(5, 10_000), b"\0" * 5760])
def test_not_fits(data: bytes) -> None:
    for chunk in (1, 3, None):
        if chunk == 1 and len(data) > 100:
            continue
        res = scan(data, chunk)
        assert res.is_fits is False
        assert res.hdus == [] and res.header == {} and not res.truncated
        assert res.problems() == [] and not res.ok
        assert res.size == len(data)


def test_truncated_in_data() -> None:
    data = sample_file()
    cut = data[:-2000]
    res = scan(cut, 1000)
    assert res.is_fits and res.truncated
    assert [h.complete for h in res.hdus] == [True, True, False]
    last = res.hdus[2]
    assert last.checksum_ok is None and last.datasum_ok is None and last.computed_datasum is None
    assert last.has_checksum and last.extname == "EVENTS"
    assert res.hdus[0].checksum_ok and res.hdus[1].checksum_ok
    assert res.problems() == ["file is truncated: HDU 2 needs 2000 more bytes"]
    assert res.metadata(["object"]) == {"OBJECT": "M31 'core'"}


def test_truncated_only_in_padding() -> None:
    data = sample_file()
    res = scan(data[:-100])
    assert res.truncated
    assert res.truncation == "HDU 2 needs 100 more bytes (only the padding of its last block is missing)"


def test_truncated_in_header() -> None:
    data = sample_file()
    res = scan(data[:BLOCK * 2 + 500], 64)
    assert res.truncated and len(res.hdus) == 1
    assert res.problems() == ["file is truncated: HDU 1 header is incomplete (no END card in its 500 bytes)"]
    res = scan(data[:1000])
    assert res.is_fits and res.truncated and res.hdus == []
    assert "HDU 0 header is incomplete" in (res.truncation or "")
    assert scan(data[:BLOCK * 2 + 5]).truncated        # b"XTENS": an extension that was cut


def test_truncated_when_a_declared_size_runs_past_eof() -> None:
    cards = [card("SIMPLE", True), card("BITPIX", 64), card("NAXIS", 2), card("NAXIS1", 100_000),
             card("NAXIS2", 100_000)]
    data = pad(b"".join([*cards, card("END")]), b" ") + b"\0" * 10_000
    res = scan(data)
    needed = -(-8 * 10**10 // BLOCK) * BLOCK - 10_000
    assert res.truncated and res.truncation == f"HDU 0 needs {needed} more bytes"


def test_mid_stream_result_is_truncated_and_the_scan_goes_on() -> None:
    data = sample_file()
    s = FitsScan()
    s.update(data[:10_000])
    assert s.result().truncated
    s.update(data[10_000:])
    assert s.result() == scan(data)


def test_trailing_bytes_after_last_hdu() -> None:
    data = sample_file()
    res = scan(data + b"\0" * BLOCK, 1000)
    assert res.trailing_bytes == BLOCK and len(res.hdus) == 3 and not res.truncated
    assert res.problems() == [f"{BLOCK} bytes after HDU 2 do not start a FITS extension"]
    res = scan(data + b"abc")
    assert res.trailing_bytes == 3 and not res.truncated


def test_invalid_header_stops_the_scan_without_exception() -> None:
    bad_ext = make_hdu([card("XTENSION", "IMAGE"), card("BITPIX", 12), card("NAXIS", 1), card("NAXIS1", 10),
                        card("EXTNAME", "ODD")], b"x" * 100)
    res = scan(primary_hdu() + bad_ext + image_ext())
    assert res.is_fits and len(res.hdus) == 1 and res.hdus[0].checksum_ok
    assert res.error == "HDU 1 (ODD): invalid header: BITPIX = 12 is not one of (8, 16, 32, 64, -32, -64)"
    assert res.problems() == [res.error]
    missing = make_hdu([card("SIMPLE", True), card("BITPIX", 8), card("NAXIS", 2), card("NAXIS1", 10)])
    assert scan(missing).error == "HDU 0: invalid header: NAXIS2 is missing"


def test_random_damage_never_raises_and_is_chunk_independent() -> None:
    data = sample_file()
    rng = random.Random(42)
    for _ in range(150):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(bad)) if rng.random() < 0.5 else rng.randrange(BLOCK)   # headers often
            bad[at] = rng.randrange(256)
        cut = bytes(bad[:rng.randrange(len(bad) + 1)] if rng.random() < 0.3 else bad)
        whole = scan(cut)
        assert scan(cut, rng.choice([5, 79, 1000, 2881])) == whole
        assert isinstance(whole.problems(), list)
        if whole.is_fits and not whole.truncated and whole.error is None and not whole.trailing_bytes:
            assert whole.problems() or cut == data


# --------------------------------------------------------------------------- keywords


def test_metadata_types_and_selection() -> None:
    res = scan(sample_file(), 7)
    md = res.metadata(["object", "OBSERVER", "exptime", "NEXP", "temp", "gain", "big", "flag", "done", "date-obs",
                       "empty", "nope", "LONGSTR", "ESO DET DIT", "hierarch eso det dit"])
    assert md == {
        "OBJECT": "M31 'core'",
        "OBSERVER": "  Ada",                     # leading blanks are significant, trailing ones are not
        "EXPTIME": 30.5,
        "NEXP": 4,
        "TEMP": -12,
        "GAIN": 0.25,
        "BIG": -1250.0,
        "FLAG": True,
        "DONE": False,
        "DATE-OBS": "2024-05-01T12:00:00",
        "LONGSTR": "part one and part two.",
        "ESO DET DIT": 1.5,
    }
    assert type(md["NEXP"]) is int and type(md["FLAG"]) is bool and type(md["EXPTIME"]) is float
    assert res.header["BITPIX"] == 16 and res.header["SIMPLE"] is True
    assert "COMMENT" not in res.header and "HISTORY" not in res.header
    assert res.hdus[0].header is res.header


def test_extension_keywords_are_kept_on_request() -> None:
    res = scan(sample_file())
    assert res.hdus[1].header == {"XTENSION": "IMAGE", "EXTNAME": "SCI"}
    assert res.metadata(["bunit"], hdu="sci") == {}
    res = scan(sample_file(), extension_keywords=["bunit"])
    assert res.metadata(["bunit", "extname"], hdu="sci") == {"BUNIT": "adu", "EXTNAME": "SCI"}
    assert res.metadata(["bunit"], hdu=1) == {"BUNIT": "adu"}
    assert res.metadata(["bunit"], hdu="nope") == {}
    every = scan(sample_file(), extension_keywords=["*"])
    assert every.hdus[2].header["TFORM1"] == "1PB(100)" and every.hdus[2].header["NAXIS2"] == 100


@pytest.mark.parametrize("text, value", [
    ("                   T", True),
    ("                   F / comment", False),
    ("                  42", 42),
    ("                 -42 / c", -42),
    ("               +1000", 1000),
    ("              1.5E10", 1.5e10),
    ("             -2.5d-3", -0.0025),
    ("                  3.", 3.0),
    ("'O''Neil '", "O'Neil"),
    ("''", ""),
    ("'a / b' / the slash in the string stays", "a / b"),
    ("'unterminated", "unterminated"),
    ("", None),
    ("      / only a comment", None),
    ("        (1.0, 2.0)", "(1.0, 2.0)"),
    ("               1_000", "1_000"),
])
def test_parse_value(text: str, value: object) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


# --------------------------------------------------------------------------- astropy, when installed


# astropy runs in a child process: tests/conftest.py puts tests/ on sys.path, where the project's
# tests/packaging package hid (now tests/package_checks) the real 'packaging' that astropy imports.

_ASTROPY_VERIFY = """
import json, sys, warnings
from astropy.io import fits
out = {}
for path in sys.argv[1:]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fits.open(path, checksum=True) as hdul:
            for hdu in hdul:
                hdu.data
    out[path] = not [w for w in caught if "sum" in str(w.message).lower()]
print(json.dumps(out))
"""

_ASTROPY_WRITE = """
import sys
import numpy as np
from astropy.io import fits
rng = np.random.default_rng(1)
primary = fits.PrimaryHDU(rng.integers(-1000, 1000, size=(64, 48)).astype(np.int16))
primary.header["OBJECT"] = ("NGC 1275", "target")
primary.header["EXPTIME"] = 12.5
primary.header["AIRMASS"] = 1.25
primary.header["NCOMBINE"] = 3
primary.header["DARKCORR"] = True
sci = fits.ImageHDU(rng.normal(size=(33, 17)).astype(np.float32), name="SCI")
spec = np.empty(50, dtype=object)
for i in range(50):
    spec[i] = np.arange(i % 7 + 1, dtype=np.int32)
table = fits.BinTableHDU.from_columns([
    fits.Column(name="TIME", format="D", array=np.arange(50.0)),
    fits.Column(name="SPEC", format="PJ()", array=spec),
], name="EVENTS")
comp = fits.CompImageHDU(rng.integers(0, 500, size=(40, 40)).astype(np.int16), name="COMP")
fits.HDUList([primary, sci, table, comp]).writeto(sys.argv[1], checksum=True)
"""


def _astropy(script: str, *args: str | Path, cwd: Path) -> str:
    if importlib.util.find_spec("astropy") is None:
        pytest.skip("astropy is not installed")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=False, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_astropy_accepts_the_files_of_the_writer_here(tmp_path: Path) -> None:
    good = tmp_path / "good.fits"
    good.write_bytes(sample_file())
    bad = tmp_path / "bad.fits"
    bad.write_bytes(flip(sample_file(), BLOCK * 3 + 10))
    verdict = json.loads(_astropy(_ASTROPY_VERIFY, good, bad, cwd=tmp_path))
    assert verdict == {str(good): True, str(bad): False}


def _astropy_file(tmp_path: Path) -> bytes:
    path = tmp_path / "astropy.fits"
    _astropy(_ASTROPY_WRITE, path, cwd=tmp_path)
    return path.read_bytes()


@pytest.mark.parametrize("chunk", [1, 2880, 1 << 20])
def test_astropy_written_file_verifies(tmp_path: Path, chunk: int) -> None:
    data = _astropy_file(tmp_path)
    if chunk == 1:
        data_scan = FitsScan()
        for i in range(len(data)):
            data_scan.update(data[i:i + 1])
        res = data_scan.result()
    else:
        res = scan(data, chunk)
    assert res.ok, res.problems()
    assert [h.extname for h in res.hdus] == [None, "SCI", "EVENTS", "COMP"]
    assert [h.xtension for h in res.hdus] == [None, "IMAGE", "BINTABLE", "BINTABLE"]
    assert all(h.checksum_ok and h.datasum_ok for h in res.hdus)
    assert res.hdus[2].header == {"XTENSION": "BINTABLE", "EXTNAME": "EVENTS"}
    assert res.metadata(["object", "exptime", "airmass", "ncombine", "darkcorr", "bitpix"]) == {
        "OBJECT": "NGC 1275", "EXPTIME": 12.5, "AIRMASS": 1.25, "NCOMBINE": 3, "DARKCORR": True, "BITPIX": 16}


def test_astropy_written_file_corrupted(tmp_path: Path) -> None:
    data = _astropy_file(tmp_path)
    hdus = scan(data).hdus
    events = hdus[2]
    # a byte in the heap of the binary table (past the rows): PCOUNT must have been counted
    bad = flip(data, events.offset + events.header_size + events.data_size - 3)
    res = scan(bad, 4096)
    assert [(h.checksum_ok, h.datasum_ok) for h in res.hdus] == [(True, True), (True, True), (False, False),
                                                                 (True, True)]
    comp = hdus[3]
    bad = flip(data, comp.offset + comp.header_size + 5)
    res = scan(bad, 4096)
    assert res.hdus[3].datasum_ok is False and res.hdus[3].checksum_ok is False
    assert res.hdus[3].header["EXTNAME"] == "COMP"
