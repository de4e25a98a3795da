import pytest

from tiermem.config import Budgets, PrefetchConfig, check_integer, format_size, parse_size
from tiermem.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096),
     (" 8 g ", 8 * 2**30), (123, 123), (None, None)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12 parsecs", "-3GiB", -1, True])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_budgets_and_format():
    b = Budgets.parse(gpu_memory="6GiB", cpu_memory=None)
    assert b.gpu_memory == 6 * 2**30 and b.cpu_memory is None
    assert format_size(1536) == "1.50 KiB"
    assert format_size(12) == "12 B"
    with pytest.raises(ConfigError):
        PrefetchConfig(lookahead=0)


def test_check_integer_takes_integers_of_any_kind_and_nothing_else():
    import numpy as np

    for value in (0, 7, np.int64(7), np.int32(0)):
        check_integer("n", value, minimum=0)
    for value, minimum, words in ((True, None, "n must be an integer, got True"), (1.5, None, "got 1.5"),
                                  ("3", None, "got '3'"), (None, None, "got None"),
                                  (-1, 0, "n must be an integer >= 0, got -1")):
        with pytest.raises(ConfigError, match=words):
            check_integer("n", value, minimum=minimum)
