"""Load shapes: load this file next to the locustfile to run one (`--shape ramp|spike|soak`).

    locust -f loadtests/locustfile.py,loadtests/shapes.py --shape spike --peak-users 200 …

- ramp: from 0 to --peak-users over half of --shape-seconds, held for the other half;
- spike: a tenth of the peak, then the whole peak for a fifth of the time, then back;
- soak: the peak for an hour.
--shape-seconds overrides the length (default: 120 s, and 3600 s for the soak).
"""

from __future__ import annotations

from locust import LoadTestShape

SOAK_SECONDS = 3600


class TesseraShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        if options is None:
            return None
        peak = options.peak_users
        default = SOAK_SECONDS if options.shape == "soak" else 120
        seconds = options.shape_seconds or default
        now = self.get_run_time()
        if options.shape == "soak":
            return (peak, max(1.0, peak / 30)) if now < seconds else None
        if now >= seconds:
            return None
        if options.shape == "ramp":
            ramp = seconds / 2
            users = peak if now >= ramp else max(1, round(peak * now / ramp))
            return users, max(1.0, peak / ramp)
        base = max(1, peak // 10)  # spike
        spike_from, spike_to = seconds * 0.4, seconds * 0.6
        users = peak if spike_from <= now < spike_to else base
        return users, float(peak)  # a spike arrives at once
