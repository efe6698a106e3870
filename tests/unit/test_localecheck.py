"""Locale names as PostgreSQL stores them against `locale -a`'s spelling."""

from dbops.ops import localecheck


def test_normalize_and_missing():
    assert localecheck.normalize("en_US.UTF-8") == localecheck.normalize("en_US.utf8") == "en_us.utf8"
    assert localecheck.normalize("de_DE.ISO-8859-1@euro") == "de_de.iso88591@euro"
    used = {"en_US.UTF-8": ["app", "postgres"], "C": ["template0"], "C.UTF-8": ["x"], "de_DE.UTF-8": ["shop"]}
    available = ["C", "C.utf8", "POSIX", "en_US.utf8"]
    assert localecheck.missing(used, available) == {"de_DE.UTF-8": ["shop"]}
    assert localecheck.missing({"POSIX": ["a"], "C": ["b"]}, []) == {}  # always there
