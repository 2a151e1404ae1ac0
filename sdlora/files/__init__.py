"""Writing files so a crash or a full disk never leaves half of one (`atomic.py`), and reading files nobody vouches for (`untrusted.py`)."""

