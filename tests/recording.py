"""A recording actuator driver: stands in for a device behind the driver interface in the
broker-free service tests (the bus drivers are exercised by the HIL tests)."""


class Recorder:
    def __init__(self):
        self.writes = []

    def write(self, frame, codes, relays):
        self.writes.append((frame, tuple(codes), tuple(relays)))
