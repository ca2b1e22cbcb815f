"""`python -m tilecore.bench.worker`: one measurement (a Job as JSON on stdin) -> one JSON line on stdout."""

from __future__ import annotations

import json
import sys

from tilecore.bench.measure import Job, measure
from tilecore.runtime.errors import TilecoreError


def main() -> None:
    job = Job.from_dict(json.loads(sys.stdin.read()))
    try:
        result = measure(job)
    except TilecoreError as exc:
        result = {"label": job.label, "backend": job.backend, "precision": job.precision, "error": str(exc)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
