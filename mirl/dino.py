"""DINO, self-distillation with no labels (Caron et al. 2021), on ResNets and Vision Transformers.

A student network (encoder and DINO head) learns to match, on every view, the output distribution a momentum
teacher gives to the two global views of the same image; the teacher sees only the global views, the student
also the small local ones (multi-crop), so the student learns local-to-global correspondence. Two forces keep
the teacher from collapsing: centring its outputs (subtracting an EMA of their batch mean) pushes towards the
uniform distribution, sharpening them (a low temperature) pushes towards one dimension; together they balance.
Its spec (options, multi-crop views, the ResNet and ViT recipes) is in `mirl.methods`.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mirl.distributed import convert_to_cross_rank_batchnorm, is_distributed, world_size
from mirl.encoders import build_encoder
from mirl.method_spec import TrainingPlan
from mirl.methods import DINOOptions
from mirl.pretraining_method import PretrainingMethod
from mirl.runtime import full_precision
from mirl.teacher import MomentumTeacher, cosine_momentum

HIDDEN_DIM, BOTTLENECK_DIM = 2048, 256
GLOBAL_VIEWS = 2


class WeightNormalizedLinear(nn.Module):
    """DINO's last layer: a linear map without bias whose weight rows are normalised to unit length (weight
    normalisation with its scale frozen at 1, the repository's `norm_last_layer`), so no prototype can grow to
    dominate the softmax."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """A 3-layer MLP (hidden 2048, GELU) to a 256-wide bottleneck, L2-normalised, then the weight-normalised
    layer to `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = HIDDEN_DIM,
                 bottleneck_dim: int = BOTTLENECK_DIM) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):  # the repository's initialisation
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@full_precision
def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """The mean over every (teacher global view i, student view j != i) pair of the cross-entropy between the
    teacher's centred and sharpened distribution softmax((t_i - c) / T_t) and the student's softmax(s_j / T_s)."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    log_predictions = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [(-target * log_predictions[j]).sum(dim=-1).mean()
             for i, target in enumerate(targets) for j in range(len(student)) if j != i]
    return torch.stack(terms).mean()


def teacher_temperature(epoch: int, options: DINOOptions) -> float:
    """The teacher's temperature in `epoch`: linear from `warmup_teacher_temp` to `teacher_temp` over the
    warm-up epochs (both ends included, as the repository's linspace), then constant."""
    warmup = options.warmup_teacher_temp_epochs
    if epoch >= warmup:
        return options.teacher_temp
    if warmup == 1:
        return options.warmup_teacher_temp
    return options.warmup_teacher_temp + (options.teacher_temp - options.warmup_teacher_temp) * epoch / (warmup - 1)


def clip_each_gradient(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient down to norm `max_norm` where it is larger (the repository clips each
    parameter on its own, not the global norm)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))


class DINO(PretrainingMethod):
    """Student and momentum teacher, each an encoder and a DINO head; a centre of the teacher's outputs.

    `forward(*views)` takes the two global views first, then the local ones. Views of one size pass the
    student together (so BatchNorm, in a ResNet, normalises the two global views as one batch, as the
    repository's multi-crop wrapper does). The teacher, its temperature and the frozen last layer follow a step
    counter kept as a buffer, so a resumed run continues every schedule exactly."""

    def __init__(self, arch: str, options: DINOOptions, plan: TrainingPlan) -> None:
        super().__init__()
        self.options, self.plan = options, plan
        encoder, feature_dim = build_encoder(arch)
        self.student_encoder = convert_to_cross_rank_batchnorm(encoder)
        self.student_head = DINOHead(feature_dim, options.out_dim)
        self.teacher_encoder = copy.deepcopy(self.student_encoder)
        self.teacher_head = copy.deepcopy(self.student_head)
        self.teacher = MomentumTeacher([self.student_encoder, self.student_head],
                                       [self.teacher_encoder, self.teacher_head])
        self.register_buffer("center", torch.zeros(1, options.out_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._logged: dict[str, torch.Tensor] = {}

    def epoch(self) -> int:
        return int(self.step) // max(1, self.plan.steps_per_epoch)

    def student_outputs(self, views: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The student's output for each view, views of one size in one pass."""
        outputs, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            batch = torch.cat(views[start:end])
            outputs += list(self.student_head(self.student_encoder(batch)).chunk(end - start))
            start = end
        return outputs

    def forward(self, *views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student = self.student_outputs(views)
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher_encoder(torch.cat(views[:GLOBAL_VIEWS])))
                           .chunk(GLOBAL_VIEWS))
        temperature = teacher_temperature(self.epoch(), self.options)
        loss = dino_loss(student, teacher, self.center, self.options.student_temp, temperature)
        if self.training:
            with torch.no_grad():
                probabilities = F.softmax((torch.cat(teacher).float() - self.center) / temperature, dim=-1)
                entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(dim=-1).mean()
                self._logged = {"teacher_entropy": entropy, "teacher_temperature": torch.tensor(temperature)}
                self.update_center(torch.cat(teacher))
        return loss, student[0]

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean of the teacher's outputs over the global batch (every process's share)."""
        total = teacher.float().sum(dim=0, keepdim=True)
        if is_distributed():
            dist.all_reduce(total)
        self.center.mul_(self.options.center_momentum).add_(total / (len(teacher) * world_size()),
                                                            alpha=1 - self.options.center_momentum)

    def parameter_groups(self) -> list[dict]:
        """Weights decay; biases and normalisation parameters (1-D) do not, as in the repository. The last layer
        is a group of its own: it has no gradient during its frozen first epoch, and an optimizer group whose
        parameters start their momentum at different steps is one that fused SGD refuses."""
        last = list(self.student_head.last_layer.parameters())
        trained = [p for p in self.parameters() if p.requires_grad and all(p is not q for q in last)]
        return [{"params": [p for p in trained if p.ndim > 1]}, {"params": last},
                {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0}]

    def after_backward(self) -> None:
        if self.options.clip_grad > 0:
            clip_each_gradient([p for p in self.parameters() if p.requires_grad], self.options.clip_grad)
        if self.epoch() < self.options.freeze_last_layer:  # the prototypes wait one epoch: training is more stable
            for parameter in self.student_head.last_layer.parameters():
                parameter.grad = None

    def after_optimizer_step(self) -> None:
        self.teacher.update(cosine_momentum(int(self.step), self.plan.total_steps, self.options.teacher_momentum))
        self.step += 1

    def logged_scalars(self) -> dict[str, torch.Tensor]:
        return self._logged

    def feature_encoder(self) -> nn.Module:
        """The encoder a downstream task inherits: the teacher's, which the paper evaluates (it is the better of
        the two throughout training, a running ensemble of students)."""
        return self.teacher_encoder


def build_dino(arch: str, options: DINOOptions, plan: TrainingPlan) -> DINO:
    return DINO(arch, options, plan)
