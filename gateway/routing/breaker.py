"""The circuit breaker each target has: consecutive failures cool it down for a while."""

import time


class Breaker:
    """Cools a target down after consecutive failures; one failure after a cooldown cools it again."""

    def __init__(self, failures_to_cool: int, cooldown: float):
        self.failures_to_cool = failures_to_cool
        self.cooldown = cooldown
        self.failures = 0
        self.cool_until = 0.0

    def remaining(self) -> float:
        return max(0.0, self.cool_until - time.monotonic())

    def succeeded(self) -> None:
        self.failures = 0
        self.cool_until = 0.0

    def failed(self) -> bool:
        """Count a failure; True when it starts a cooldown."""
        self.failures += 1
        if self.failures < self.failures_to_cool:
            return False
        self.cool_until = time.monotonic() + self.cooldown
        return True

    def health(self) -> dict:
        remaining = self.remaining()
        return {
            "state": "cooling" if remaining else "ok",
            "consecutive_failures": self.failures,
            "cooldown_remaining_s": round(remaining, 1),
        }
