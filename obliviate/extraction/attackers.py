"""Attackers: how a thief turns bought labels into a substitute (SPEC section 3b).

An attacker is a pure function ``fn(*, images, labels, unlabeled, options, seed, num_classes,
levels) -> Substitute``: the bought images and the target's answers for them, the rest of the
attacker's pool (unlabeled), typed options and a seed. Attackers never hold the target, so they
cannot spend a query: the budget is spent by the selector before they run.

The answers are labels ``(n,)`` by default, or class probabilities ``(n, C)`` when the target
answers them (SPEC section 3's probabilities switch). Every attacker trains on them through the one
loss, ``F.cross_entropy``, which takes class indices or class probabilities as its target
(:func:`obliviate.extraction.substitute.targets_tensor`): given probabilities, the bought images'
term is the cross-entropy to the target's soft answers; pseudo-labels of the unlabeled pool stay
hard classes (as one-hot rows beside soft ones).

* ``basic``: :func:`obliviate.extraction.substitute.train_classifier`, a fixed 300 Adam steps on
  the bought set: the weak reference the audit used before issue 13.
* ``augmented``: label-preserving augmentation (:mod:`obliviate.extraction.augment`), a cosine
  learning-rate schedule, a training length that grows with the bought set, and early stopping
  on a held-out part of the bought set (no extra queries).
* ``pseudo_label``: ``augmented``, then rounds of self-training on the unlabeled pool: the
  substitute labels the un-augmented pool images, those above a confidence threshold join
  training as augmented images (the audit's default before FixMatch replaced it).
* ``semi_supervised``: ``augmented``, then FixMatch consistency training on
  the unlabeled pool (:mod:`obliviate.extraction.consistency`; Sohn et al., NeurIPS 2020): one loss
  per step, the bought labels plus confident weak-view labels of pool images imposed on their
  strong views. Semi-supervised extraction is Jagielski et al., "High accuracy and high fidelity
  extraction of neural networks", USENIX Security 2020 (they used MixMatch, Berthelot et al. 2019).
* ``semi_supervised_ensemble`` (the audit's default, :mod:`obliviate.extraction.ensemble`): three
  ``semi_supervised`` substitutes of consecutive seeds, the mean of their softmax.

Adding an attacker = one function with the ``@attacker(name)`` decorator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from obliviate.defaults import (
    ATTACK_CONSISTENCY_STEPS,
    ATTACK_MAX_STEPS,
    ATTACK_MIN_STEPS,
    ATTACK_ROUND_STEPS,
    ATTACK_ROUNDS,
    DEFAULT_ATTACKER,  # noqa: F401 (re-exported from its old home)
)
from obliviate.errors import ConfigError, DataError
from obliviate.extraction.augment import AugmentOptions, random_affine
from obliviate.extraction.consistency import fixmatch
from obliviate.extraction.substitute import (
    TrainConfig,
    check_images,
    check_targets,
    check_training_seed,
    targets_tensor,
    train_classifier,
)
from obliviate.models import build_model, check_arch, images_to_tensor


@dataclass(frozen=True)
class AttackOptions:
    """How the attackers train (one options object serves all three; each reads its part).

    Attributes:
        arch: substitute architecture (``lenet5`` or ``c3f2``).
        batch_size: labelled images per step (pseudo-labelled ones add as many again).
        lr: peak Adam learning rate (cosine-annealed to 0 in each phase; ``basic`` uses it flat).
        basic_steps: ``basic``'s fixed number of steps.
        min_steps: the least steps of the supervised phase.
        steps_per_image: the supervised phase trains ``min_steps + steps_per_image * n`` steps
            (capped at ``max_steps``) for ``n`` bought images: length scales with the bought set.
        max_steps: cap of the supervised phase.
        holdout: share of the bought set held out for early stopping (none below 10 images).
        eval_every: steps between evaluations on the held-out part.
        patience: evaluations without improvement before stopping.
        augment: augmentation ranges.
        consistency_steps: FixMatch steps of ``semi_supervised`` after its supervised phase.
        unlabeled_ratio: pool images per bought image in each FixMatch step (FixMatch's mu).
        consistency_threshold: least confidence on the weak view for a pool image to count.
        consistency_weight: weight of the pool term in the FixMatch loss (FixMatch's lambda_u).
        strong: the second view's affine ranges (cutout is added on top).
        cutout: side of the square the strong view erases (0: none).
        rounds: self-training rounds of ``pseudo_label``.
        threshold: least softmax confidence for a pool image to get a pseudo-label.
        round_steps: steps per self-training round.
        fresh_student: each round trains a freshly initialised student (seeded per round) rather
            than fine-tuning the teacher, which would mostly confirm its own labels (Noisy Student,
            Xie et al., CVPR 2020).
        tta: augmented views averaged with the plain image when pseudo-labelling (0: plain only).
        members: substitutes of ``semi_supervised_ensemble`` (:mod:`obliviate.extraction.ensemble`).
    """

    arch: str = "lenet5"
    batch_size: int = 64
    lr: float = 2e-3
    basic_steps: int = 300
    min_steps: int = ATTACK_MIN_STEPS
    steps_per_image: float = 2.0
    max_steps: int = ATTACK_MAX_STEPS
    holdout: float = 0.1
    eval_every: int = 50
    patience: int = 6
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    consistency_steps: int = ATTACK_CONSISTENCY_STEPS
    unlabeled_ratio: int = 2
    consistency_threshold: float = 0.95
    consistency_weight: float = 1.0
    # Tuned on splits 11-12 (never reported): FixMatch's stronger view (25 degrees, 0.15 shift, 0.8-1.2
    # zoom, cutout 10) lost about 1.5 agreement points at k = 50 against an independent second draw of
    # the weak ranges, and tied at k = 600; MNIST digits do not survive heavy distortion unchanged.
    strong: AugmentOptions = field(default_factory=AugmentOptions)
    cutout: int = 0
    rounds: int = ATTACK_ROUNDS
    threshold: float = 0.9
    round_steps: int = ATTACK_ROUND_STEPS
    fresh_student: bool = True
    tta: int = 0
    members: int = 3

    def __post_init__(self) -> None:
        check_arch(self.arch)
        if min(self.batch_size, self.basic_steps, self.min_steps, self.eval_every, self.patience) < 1:
            raise ConfigError(
                "batch_size, basic_steps, min_steps, eval_every and patience must be >= 1; got "
                f"{self.batch_size}, {self.basic_steps}, {self.min_steps}, {self.eval_every}, {self.patience}."
            )
        if self.lr <= 0 or self.max_steps < self.min_steps or not 0 <= self.holdout < 0.5:
            raise ConfigError(
                f"need lr > 0, max_steps >= min_steps, 0 <= holdout < 0.5; got {self.lr}, {self.max_steps}, "
                f"{self.holdout}."
            )
        if (
            self.consistency_steps < 0
            or self.unlabeled_ratio < 1
            or not 0 < self.consistency_threshold <= 1
            or self.consistency_weight < 0
            or self.cutout < 0
        ):
            raise ConfigError(
                "need consistency_steps >= 0, unlabeled_ratio >= 1, 0 < consistency_threshold <= 1, "
                f"consistency_weight >= 0, cutout >= 0; got {self.consistency_steps}, {self.unlabeled_ratio}, "
                f"{self.consistency_threshold}, {self.consistency_weight}, {self.cutout}."
            )
        if not self.steps_per_image >= 0 or self.tta < 0:
            raise ConfigError(
                f"need steps_per_image >= 0 and tta >= 0 (augmented views; 0: none); got {self.steps_per_image}, "
                f"{self.tta}. The supervised phase trains min_steps + steps_per_image * n steps."
            )
        if self.rounds < 0 or not 0 < self.threshold <= 1 or self.round_steps < 1 or self.members < 1:
            raise ConfigError(
                f"need rounds >= 0, 0 < threshold <= 1, round_steps >= 1, members >= 1; got {self.rounds}, "
                f"{self.threshold}, {self.round_steps}, {self.members}."
            )

    def supervised_steps(self, n: int) -> int:
        """Steps of the supervised phase for ``n`` bought images."""
        return int(min(self.max_steps, self.min_steps + self.steps_per_image * n))


#: The attackers that train ``basic_steps`` (``--steps``) rather than the supervised schedule ``--attack-steps`` caps.
_FIXED_STEP_ATTACKERS = ("basic",)


def step_cap_shortfall(*, attackers: Sequence[str], budgets: Sequence[int], attack_steps: int) -> str | None:
    """Why ``attack_steps`` starves the grid's attackers, or ``None`` when it does not.

    Every attacker but ``basic`` trains a supervised phase of :meth:`AttackOptions.supervised_steps` steps (at least
    ``min_steps``, more per bought image), which ``attack_steps`` caps (``steal_flow`` lowers ``min_steps`` to it).
    Below ``min_steps`` the cap cuts that schedule at every budget. Probe 113, digits: ``augmented`` agreed 8-21 %
    (chance) with the target at ``--attack-steps 100`` against 76 % at the default, so such rows rank a starved
    attacker beside the others.
    """
    schedule = AttackOptions()
    starved = [name for name in attackers if name not in _FIXED_STEP_ATTACKERS]
    if attack_steps >= schedule.min_steps or not starved:
        return None
    wanted = ", ".join(f"{schedule.supervised_steps(b)} at {b} queries" for b in sorted(budgets))
    return (
        f"--attack-steps {attack_steps} is below {schedule.min_steps}, the fewest supervised steps the "
        f"attacker{'s' if len(starved) > 1 else ''} {', '.join(starved)} train{'' if len(starved) > 1 else 's'} at any "
        f"budget (the schedule: {schedule.min_steps} + {schedule.steps_per_image:g} per bought image, at most "
        f"{ATTACK_MAX_STEPS}; here {wanted}), so the substitutes trained at most {attack_steps} steps and the "
        f"agreement understates what the attacker{'s' if len(starved) > 1 else ''} reach{'' if len(starved) > 1 else 'es'}. Give --attack-steps "
        f"{schedule.min_steps} or more (default {ATTACK_MAX_STEPS}) for a fair ranking"
    )


@dataclass
class Substitute:
    """A trained substitute and what its training did (steps, stops, pseudo-labels per round)."""

    model: nn.Module
    info: dict = field(default_factory=dict)


Attacker = Callable[..., Substitute]


@dataclass(frozen=True)
class AttackerSpec:
    name: str
    fn: Attacker
    summary: str
    #: What the attacker must hold besides the bought labels (stated in the audit's threat model).
    assumes: str


ATTACKERS: dict[str, AttackerSpec] = {}

# DEFAULT_ATTACKER, the attacker the audit assumes by default, is held in obliviate.defaults (re-exported here).


def attacker(name: str, *, assumes: str) -> Callable[[Attacker], Attacker]:
    """Register ``fn`` under ``name``; its docstring's first line becomes its summary."""

    def register(fn: Attacker) -> Attacker:
        if name in ATTACKERS:
            raise ConfigError(f"attacker {name!r} is registered twice; pick another name.")
        summary = (fn.__doc__ or name).strip().splitlines()[0]
        ATTACKERS[name] = AttackerSpec(name, fn, summary, assumes)
        return fn

    return register


def get_attacker(name: str) -> AttackerSpec:
    """The registered attacker ``name`` (SPEC section 3b).

    Args:
        name: a key of :data:`ATTACKERS` (``basic``, ``augmented``, ``pseudo_label``, ``semi_supervised``,
            ``semi_supervised_ensemble``).

    Returns:
        its :class:`AttackerSpec`: the training function, its summary and what it assumes the thief holds.

    Raises:
        ConfigError: no attacker is registered under ``name``; the message lists those that are.
    """
    if name not in ATTACKERS:
        raise ConfigError(f"unknown attacker {name!r}: choose from {', '.join(ATTACKERS)}.")
    return ATTACKERS[name]


def train_substitute(
    name: str,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    unlabeled: np.ndarray,
    options: AttackOptions = AttackOptions(),
    seed: int,
    num_classes: int = 10,
    levels: int = 256,
) -> Substitute:
    """Run attacker ``name`` (see :data:`ATTACKERS`) on bought ``(images, labels)`` and the ``unlabeled`` rest.

    SPEC section 3b: attackers never hold the target; the budget was spent before they run.

    Args:
        name: a registered attacker (:func:`get_attacker`).
        images: ``(n, H, W)`` uint8 bought images, ``n >= 1``.
        labels: the target's answers for them: ``(n,)`` classes, whole numbers in ``0..num_classes-1``, or
            ``(n, num_classes)`` class probabilities (the target's probabilities switch), trained on as soft targets.
        unlabeled: ``(m, H, W)`` uint8 rest of the attacker's pool, the same ``H, W`` (``m`` may be 0).
        options: how the attackers train.
        seed: seed of weights, data order and augmentation, a whole number >= 0.
        num_classes: classes of the task.
        levels: gray levels of the images.

    Returns:
        the trained :class:`Substitute` (model in evaluation mode, training info).

    Raises:
        ConfigError: unknown attacker, no images or a label count that differs, ``num_classes`` below 1, or a
            seed that is not a whole number >= 0.
        DataError: images or unlabeled images that are not ``(n, H, W)`` uint8, unlabeled images of another size
            than the bought ones, or answers that are neither whole class numbers in ``0..num_classes-1`` nor rows
            of ``num_classes`` probabilities.
    """
    spec = get_attacker(name)
    images = check_images(images, allow_empty=True)
    if len(images) == 0 or len(images) != len(labels):
        raise ConfigError(f"need as many labels as images, at least one; got {len(images)} and {len(labels)}.")
    labels = check_targets(labels, num_classes=num_classes)
    unlabeled = check_images(unlabeled, what="unlabeled", allow_empty=True)
    if unlabeled.shape[1:] != images.shape[1:]:
        raise DataError(
            f"unlabeled images must have the bought images' size {images.shape[1]}x{images.shape[2]}; got "
            f"{unlabeled.shape[1]}x{unlabeled.shape[2]}. Pass the rest of the same pool (or pool.images[:0] for none)."
        )
    check_training_seed(seed)
    return spec.fn(
        images=images,
        labels=labels,
        unlabeled=unlabeled,
        options=options,
        seed=seed,
        num_classes=num_classes,
        levels=levels,
    )


@attacker("basic", assumes="bought labels only")
def basic(
    *,
    images: np.ndarray,
    labels: np.ndarray,
    unlabeled: np.ndarray,
    options: AttackOptions,
    seed: int,
    num_classes: int,
    levels: int,
) -> Substitute:
    """Fixed 300 Adam steps on the bought set, no augmentation (the weak reference)."""
    config = TrainConfig(arch=options.arch, steps=options.basic_steps, batch_size=options.batch_size, lr=1e-3)
    model = train_classifier(
        images=images, labels=labels, config=config, seed=seed, num_classes=num_classes, levels=levels
    )
    return Substitute(model, {"steps": options.basic_steps})


@attacker("augmented", assumes="bought labels; the task's image geometry (label-preserving shifts)")
def augmented(
    *,
    images: np.ndarray,
    labels: np.ndarray,
    unlabeled: np.ndarray,
    options: AttackOptions,
    seed: int,
    num_classes: int,
    levels: int,
) -> Substitute:
    """Augmentation, cosine schedule, length scaling with the bought set, early stopping on a held-out part."""
    state = _Fit.start(images, labels, options=options, seed=seed, num_classes=num_classes, levels=levels)
    info = state.train(steps=options.supervised_steps(len(images)), pseudo=None)
    return Substitute(state.model.eval(), {"supervised": info})


@attacker(
    "semi_supervised",
    assumes="bought labels; the unlabeled pool (its other images); the task's image geometry",
)
def semi_supervised(
    *,
    images: np.ndarray,
    labels: np.ndarray,
    unlabeled: np.ndarray,
    options: AttackOptions,
    seed: int,
    num_classes: int,
    levels: int,
) -> Substitute:
    """``augmented``, then FixMatch consistency training on the unlabeled pool (Sohn et al. 2020)."""
    state = _Fit.start(images, labels, options=options, seed=seed, num_classes=num_classes, levels=levels)
    info: dict = {"supervised": state.train(steps=options.supervised_steps(len(images)), pseudo=None)}
    # The held-out part served early stopping; FixMatch trains on every bought label.
    info["consistency"] = fixmatch(
        state.model,
        x=torch.cat([state.x, state.val_x]),
        y=torch.cat([state.y, state.val_y]),
        pool=images_to_tensor(unlabeled, levels=levels),
        options=options,
        generator=state.generator,
    )
    return Substitute(state.model.eval(), info)


@attacker(
    "pseudo_label",
    assumes="bought labels; the unlabeled pool (its other images); the task's image geometry",
)
def pseudo_label(
    *,
    images: np.ndarray,
    labels: np.ndarray,
    unlabeled: np.ndarray,
    options: AttackOptions,
    seed: int,
    num_classes: int,
    levels: int,
) -> Substitute:
    """``augmented``, then self-training rounds on confident pseudo-labels of the unlabeled pool."""
    state = _Fit.start(images, labels, options=options, seed=seed, num_classes=num_classes, levels=levels)
    info: dict = {"supervised": state.train(steps=options.supervised_steps(len(images)), pseudo=None), "rounds": []}
    pool_x = images_to_tensor(unlabeled, levels=levels)
    for r in range(options.rounds if len(pool_x) else 0):
        probs = torch.softmax(_logits(state.model, pool_x), dim=1)
        for _ in range(options.tta):
            view = random_affine(pool_x, options=options.augment, generator=state.generator)
            probs += torch.softmax(_logits(state.model, view), dim=1)
        probs /= 1 + options.tta
        confidence, guess = probs.max(dim=1)
        keep = confidence >= options.threshold
        if not bool(keep.any()):
            break
        if options.fresh_student:
            state.model = build_model(
                options.arch, num_classes=num_classes, in_channels=1, image_size=images.shape[1], seed=seed + r + 1
            )
        round_info = state.train(steps=options.round_steps, pseudo=(pool_x[keep], guess[keep]))
        round_info["pseudo_labels"] = int(keep.sum())
        info["rounds"].append(round_info)
    return Substitute(state.model.eval(), info)


# --------------------------------------------------------------------------- training loop


@dataclass
class _Fit:
    """One substitute under training: its data split, generator, and best state so far."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    options: AttackOptions
    generator: torch.Generator

    @classmethod
    def start(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        options: AttackOptions,
        seed: int,
        num_classes: int,
        levels: int,
    ) -> _Fit:
        model = build_model(options.arch, num_classes=num_classes, in_channels=1, image_size=images.shape[1], seed=seed)
        x = images_to_tensor(images, levels=levels)
        y = targets_tensor(labels)  # class indices, or class probabilities: cross_entropy takes either
        n_val = round(options.holdout * len(x)) if len(x) >= 10 else 0
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
        val, train = order[:n_val], order[n_val:]
        generator = torch.Generator().manual_seed(int(seed))
        return cls(model, x[train], y[train], x[val], y[val], options, generator)

    def train(self, *, steps: int, pseudo: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
        """Adam with a cosine schedule for up to ``steps`` steps; keeps the state with the lowest
        held-out loss (evaluated every ``eval_every`` steps) and stops after ``patience`` evaluations
        without improvement, once half the steps are done. Each step: a batch of augmented bought
        images, plus up to ``batch_size`` augmented pseudo-labelled pool images when ``pseudo`` is given."""
        o = self.options
        opt = torch.optim.Adam(self.model.parameters(), lr=o.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
        batch = min(o.batch_size, len(self.x))
        # The state at the start (untrained, or the teacher's) never wins: a 5-image held-out part
        # must not send a trained model back to its initialisation. No stop before half the steps.
        best_loss, best_state, best_step, waited, step = float("inf"), None, 0, 0, 0
        for step in range(1, steps + 1):
            self.model.train()
            idx = torch.randint(len(self.x), (batch,), generator=self.generator)
            xb, yb = self.x[idx], self.y[idx]
            if pseudo is not None:
                # As many pseudo-labelled images as labelled ones at most: a few confident pool images
                # must not outweigh the bought labels.
                pidx = torch.randint(len(pseudo[0]), (min(o.batch_size, len(pseudo[0])),), generator=self.generator)
                xb, yb = torch.cat([xb, pseudo[0][pidx]]), torch.cat([yb, _like(pseudo[1][pidx], yb)])
            xb = random_affine(xb, options=o.augment, generator=self.generator)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(xb), yb).backward()
            opt.step()
            sched.step()
            if len(self.val_x) and (step % o.eval_every == 0 or step == steps):
                loss = self._val_loss()
                if loss < best_loss:
                    best_loss, best_state, best_step, waited = loss, copy.deepcopy(self.model.state_dict()), step, 0
                else:
                    waited += 1
                    if waited >= o.patience and step >= steps // 2:
                        break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        else:
            best_step = step
        self.model.eval()
        return {"steps_run": step, "best_step": best_step, "holdout": len(self.val_x), "holdout_loss": best_loss}

    def _val_loss(self) -> float:
        if not len(self.val_x):
            return float("inf")
        with torch.no_grad():
            return float(F.cross_entropy(_logits(self.model, self.val_x), self.val_y))


def _like(classes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hard ``classes`` in the form of ``targets``: themselves beside labels, one-hot rows beside probabilities
    (cross-entropy to a one-hot row is cross-entropy to its class, so a pseudo-label weighs the same either way)."""
    if targets.ndim == 1:
        return classes
    return F.one_hot(classes, num_classes=targets.shape[1]).to(targets.dtype)


def _logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)])
