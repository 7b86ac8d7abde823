"""GPU memory of a training configuration: the planner (pure arithmetic on the model's shape, no
Lightning import), the ``phi2tutor plan`` command, and a live-tensor counter for measuring a real step
(phi2tutor.memory.tracker, imports torch; not imported here).
"""

from phi2tutor.memory.plan_command import main_plan as main_plan
from phi2tutor.memory.planner import *  # noqa: F403
