"""What the Python comparison scripts share (they run from benches/, so this module is importable)."""
from datetime import datetime


def epoch_s(started):
    """The `started` column as epoch seconds: ZonedTimestamp text, or Timestamp epoch milliseconds."""
    if isinstance(started, str):
        return int(datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp())
    return int(started) // 1000


def peak_rss_mb():
    """VmHWM: unlike getrusage's ru_maxrss, it is not inherited across fork and exec from the parent."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
