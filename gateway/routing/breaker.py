"""The circuit breaker each target has: consecutive failures cool it down for a while."""

import time

from gateway.state.shared import Circuit, Cooling

# What was seen of a circuit is trusted this long: a replica reads a shared one (in Redis) at most twice a second per
# target rather than once per request, and sees a cooldown another replica started within half a second.
FRESH_S = 0.5


class Breaker:
    """Cools a target down after consecutive failures; one failure after a cooldown cools it again. The count and
    the cooldown live in `circuit` (this replica's, or shared by replicas); what was last seen of them answers
    `remaining` and `health` without a wait, and `check` reads them again once that is FRESH_S old."""

    def __init__(self, circuit: Circuit):
        self.circuit = circuit
        self.failures = 0
        self.cool_until = 0.0
        self.fresh_until = 0.0  # until when what was seen is trusted

    async def check(self) -> float:
        """The seconds of cooldown left, as the circuit said at most FRESH_S ago."""
        if time.monotonic() >= self.fresh_until:
            self._see(await self.circuit.read())
        return self.remaining()

    def remaining(self) -> float:
        return max(0.0, self.cool_until - time.monotonic())

    async def succeeded(self) -> None:
        if self.failures:  # as last seen: most requests succeed where nothing failed, with nothing to write
            await self.circuit.succeeded()
            self._see(Cooling(0, 0.0))

    async def failed(self) -> bool:
        """Count a failure; True when it starts a cooldown."""
        cooling = await self.circuit.failed()
        self._see(cooling)
        return cooling.started

    def _see(self, cooling: Cooling) -> None:
        now = time.monotonic()
        self.failures, self.cool_until, self.fresh_until = cooling.failures, now + cooling.remaining, now + FRESH_S

    def health(self) -> dict:
        remaining = self.remaining()
        return {
            "state": "cooling" if remaining else "ok",
            "consecutive_failures": self.failures,
            "cooldown_remaining_s": round(remaining, 1),
        }
