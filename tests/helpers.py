"""Small pieces several test files share (not collected by pytest: no test_ prefix)."""
import torch.nn as nn

import neumeta as nm


class Crash(Exception):
    """What ``CrashingTask`` raises: a fit dying mid-run."""


class CrashingTask(nm.ClassificationTask):
    """Classification whose ``crash_at``-th loss call raises ``Crash``: a fit killed mid-step."""

    def __init__(self, crash_at):
        super().__init__(10)
        self.calls, self.crash_at = 0, crash_at

    def loss(self, outputs, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash()
        return super().loss(outputs, batch)


class TwoLayer(nn.Module):
    """6 inputs, 12 hidden channels (one morphable group, fc1), 4 outputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.fc2(nn.functional.relu(self.fc1(x)))
