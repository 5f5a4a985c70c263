"""bench/throughput.py: arguments that would waste a device call stop it before any work."""

import pytest
import throughput


def test_a_timeout_shorter_than_max_time_and_the_run_around_it_is_refused():
    # the fourth lease lost a row this way: 3:50 of fit + load + export > 270 s
    with pytest.raises(SystemExit, match="fast.*exceeds --timeout 270 s"):
        throughput.check_args(["fast"], {"fast": "00:00:03:50"}, 270)
    throughput.check_args(["fast"], {"fast": "00:00:03:50"}, 300)
    throughput.check_args(["fast"], {"fast": "00:00:03:50"}, None)  # no timeout: no limit


def test_max_time_must_name_a_variant_and_be_days_hours_minutes_seconds():
    with pytest.raises(SystemExit, match="'fsat' is not one of --variants"):
        throughput.check_args(["fast"], {"fsat": "00:00:03:00"}, None)
    with pytest.raises(SystemExit, match="'3:00' is not DD:HH:MM:SS"):
        throughput.check_args(["fast"], {"fast": "3:00"}, None)
    assert throughput.seconds("01:02:03:04") == 93784


def test_an_unknown_variant_option_is_refused():
    with pytest.raises(SystemExit, match="unknown variant 'fast\\+nocll'"):
        throughput.check_args(["fast+nocll"], {}, None)
