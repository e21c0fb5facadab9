import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # helpers.py and toy_zoo.py


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """Name the random order's seed even under -q, so a failing order can be re-run
    with ``pytest --randomly-seed=N``."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed} "
                                    f"(re-run this order with --randomly-seed={seed})")
