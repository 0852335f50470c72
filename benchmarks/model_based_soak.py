"""Model-based soak: run tests/test_manager_model_based.py under its `soak` hypothesis profile and summarise.

    python benchmarks/model_based_soak.py                         # the soak profile: 150 runs of up to 40 rules
    python benchmarks/model_based_soak.py --hypothesis-seed=7     # other arguments go to pytest as they are

The default test suite runs a few short derandomized runs; the soak profile (registered in
tests/conftest.py) tries many more, with fresh random choices each time, and shrinks any
failure to a short sequence of rules that hypothesis prints. Prints one JSON summary line
(profile, runs tried, rule steps checked, rules taken, seconds) and exits with pytest's
exit code: 0 when every run matched the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = "MODEL_BASED_SUMMARY "


def main() -> int:
    command = [
        sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "--show-capture=no",
        "--hypothesis-profile=soak", "tests/test_manager_model_based.py", *sys.argv[1:],
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    summary = next((json.loads(line[len(SUMMARY):]) for line in lines if line.startswith(SUMMARY)), None)
    if result.returncode != 0 or summary is None:
        print("\n".join(line for line in lines if not line.startswith(("INFO ", "DEBUG ", "WARNING "))), file=sys.stderr)
        print(result.stderr[-5000:], file=sys.stderr)
    print(json.dumps(summary or {"failed": True, "pytest_exit_code": result.returncode}))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
