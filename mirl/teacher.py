"""The momentum teacher shared by MoCo (key encoder), BYOL (target network) and DINO (teacher): a copy of the
student's networks that receives no gradient and trails the student by an exponential moving average."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's and DINO's schedule of the teacher's rate: `base` at the start, 1 at the end, along a cosine."""
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total_steps) / max(1, total_steps)) + 1) / 2


class MomentumTeacher:
    """Teacher networks that start as copies of student networks (pair by pair) and never receive a gradient;
    `update(m)` moves every teacher parameter to m * teacher + (1 - m) * student.

    It holds the modules, not their parameters, so moving the method to a device or loading a state keeps it
    right. `per_parameter` (the benchmark's reference code path) updates one parameter at a time, as the papers'
    code does, instead of one fused operation over all of them."""

    def __init__(self, students: Sequence[nn.Module], teachers: Sequence[nn.Module]) -> None:
        self.students, self.teachers = list(students), list(teachers)
        self.per_parameter = False
        for student, teacher in zip(self.students, self.teachers, strict=True):
            teacher.load_state_dict(student.state_dict())
            teacher.requires_grad_(False)

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for student in self.students for p in student.parameters()]

    def teacher_parameters(self) -> list[nn.Parameter]:
        return [p for teacher in self.teachers for p in teacher.parameters()]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if self.per_parameter:
            for student, teacher in zip(self.student_parameters(), self.teacher_parameters()):
                teacher.mul_(momentum).add_(student.detach(), alpha=1.0 - momentum)
            return
        torch._foreach_lerp_(self.teacher_parameters(), self.student_parameters(), 1.0 - momentum)


def momentum_teachers(model: nn.Module) -> list[MomentumTeacher]:
    """Every momentum teacher a method's network holds."""
    return [value for module in model.modules() for value in vars(module).values()
            if isinstance(value, MomentumTeacher)]
