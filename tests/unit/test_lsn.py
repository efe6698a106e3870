import pytest

from dbops.pg import lsn


def test_lsn_round_trip():
    assert lsn.parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn.format_lsn(lsn.parse_lsn("0/3000028")) == "0/3000028"
    with pytest.raises(ValueError):
        lsn.parse_lsn("nonsense")


def test_segment_names():
    assert lsn.segment_of_lsn(1, lsn.parse_lsn("0/3000028")) == "000000010000000000000003"
    assert lsn.segment_of_lsn(2, lsn.parse_lsn("1/FF000000")) == "0000000200000001000000FF"
    assert lsn.next_segment("0000000100000000000000FF") == "000000010000000100000000"
    assert lsn.parse_segment_name("00000003000000020000000A") == (3, 2 * 256 + 10)


def test_wal_file_kinds():
    assert lsn.is_wal_file("00000002.history")
    assert lsn.is_wal_file("000000010000000000000003.partial")
    assert lsn.is_wal_file("000000010000000000000002.00000028.backup")
    assert not lsn.is_wal_file("../etc/passwd")


def test_parse_history():
    text = "1\t0/3000198\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n"
    assert lsn.parse_history(text) == [(1, 0x3000198, "no recovery target specified"),
                                       (2, 0x5000000, 'at restore point "x"')]
