"""Run a script or module with a SIGKILL armed at a named fault point of the save path.

```bash
python -m hf_rl_ckpt.testing.crash --at commit.before_rename@3 -- train.py --steps 10
python -m hf_rl_ckpt.testing.crash --at save.part_written -- -m my_package.train
```

`--at POINT@N` kills the process the N-th time a save passes POINT (the first time without
`@N`); the points are `hf_rl_ckpt.faultpoint.ALL_POINTS`. The script runs in this
process (`runpy`), as `python script.py args` or `python -m module args` would run it, so
the kill is real and lands exactly there. A fork server that already runs the training code
arms the same kill with `arm_kill`.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .. import faultpoint


def parse_point(spec: str) -> tuple[str, int]:
    """`"name@N"` -> (name, N); `"name"` -> (name, 1).

    ```python
    >>> parse_point("commit.before_rename@3")
    ('commit.before_rename', 3)

    ```

    Raises:
        ValueError: N is not a positive integer.
    """
    name, _, nth = spec.partition("@")
    if nth and not nth.isdigit():
        raise ValueError(f"{spec!r}: the hit after '@' must be a positive integer, e.g. {name}@3")
    return name, int(nth or 1)


def arm_kill(spec: str) -> None:
    """SIGKILL this process at the fault point `spec` names (`"commit.before_rename@3"`).

    Raises:
        ValueError: an unknown point or a malformed hit count.
    """
    name, at_hit = parse_point(spec)
    faultpoint.arm(name, faultpoint.kill, at_hit=at_hit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hf_rl_ckpt.testing.crash",
        description="Run a script (or -m module) and SIGKILL it at a named fault point of the save path.",
    )
    parser.add_argument("--at", required=True, metavar="POINT[@N]", help=f"one of {', '.join(faultpoint.ALL_POINTS)}; @N: at its N-th hit")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="-- script.py args | -- -m module args")
    args = parser.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target or target == ["-m"]:
        parser.error("name a script or '-m module' to run after --")
    try:
        arm_kill(args.at)
    except ValueError as err:
        parser.error(str(err))
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))  # as `python script.py` puts the script's folder first
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
