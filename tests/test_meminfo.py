"""The one /proc/meminfo reader, on files written here (the node's and the RPC server's memory figures)."""

from zswarm.meminfo import memory_bytes


def test_total_and_available_in_bytes(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16318480 kB\nMemFree:         1234567 kB\nMemAvailable:    8159240 kB\n"
                 "HugePages_Total:       0\n")
    assert memory_bytes(str(f)) == (16318480 * 1024, 8159240 * 1024)


def test_a_missing_figure_or_file_reads_as_zero(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16318480 kB\n")  # kernels before 3.14 have no MemAvailable
    assert memory_bytes(str(f)) == (16318480 * 1024, 0)
    assert memory_bytes(str(tmp_path / "absent")) == (0, 0)


def test_this_machine():
    total, avail = memory_bytes()
    assert total > 0 and 0 < avail <= total
