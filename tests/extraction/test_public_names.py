"""obliviate/extraction/__init__.py promises: public names are importable from ``obliviate.extraction`` (and listed
in its ``__all__``). A module's new public name is either exported or named below as deliberately module-only, so
a helper that several modules (and a user writing an attacker) use cannot be left out unnoticed, as the
probabilities switch's ``check_targets`` / ``targets_tensor`` / ``hard_labels`` were."""

from __future__ import annotations

from pathlib import Path

import obliviate.extraction as package

PACKAGE_DIR = Path(package.__file__).parent

#: Public names reached another way or only the CLI's and the bench's business, per module.
MODULE_ONLY = {
    # The registered attackers are reached by name (ATTACKERS, get_attacker, train_substitute); Attacker is
    # AttackerSpec.fn's type.
    "attackers": {"Attacker", "augmented", "basic", "pseudo_label", "semi_supervised"},
    # The command line's split and pool checks and the bench's split constants.
    "audit": {
        "BENCH_DATASET",
        "BENCH_SPLIT_SIZES",
        "DEFAULT_TARGET_TRAIN_SIZE",
        "check_pool_fits_target",
        "check_split_fits",
        "default_target_train_size",
        "fit_split",
        "forgotten_rows",
        "is_bench_split",
        "target_training_indices",
    },
    "augment": {"cutout"},  # FixMatch's strong augmentation, inside semi_supervised
    "consistency": {"fixmatch"},  # semi_supervised's training loop
    "selectors": {"check_feature_dims"},  # the command line's --feature-dims check
    # HttpBackend's pacing of retries and wait notices.
    "target": {"MAX_BACKOFF_S", "WAIT_NOTICE_AFTER_S", "WAIT_NOTICE_EVERY_S"},
}

#: What a caller of the probabilities switch (SPEC section 3) uses: the answer forms and their one check.
PROBABILITIES_SWITCH = {
    "OutputMode",
    "output_mode",
    "check_targets",
    "targets_tensor",
    "hard_labels",
    "answer_classes",
    "rows_not_probabilities",
    "PROBABILITY_SUM_TOLERANCE",
}


def test_every_public_name_of_every_module_is_exported_or_named_module_only(public_names) -> None:
    missing = {}
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        left = public_names(path) - MODULE_ONLY.get(path.stem, set())
        absent = sorted(n for n in left if not hasattr(package, n) or n not in package.__all__)
        if absent:
            missing[path.stem] = absent
    assert not missing, f"public names not exported by obliviate.extraction: {missing}"


def test_module_only_names_exist(public_names) -> None:
    """A name renamed or removed leaves the list above, so the list cannot hide a later name of the same spelling."""
    stale = {
        module: sorted(names - public_names(PACKAGE_DIR / f"{module}.py"))
        for module, names in MODULE_ONLY.items()
        if names - public_names(PACKAGE_DIR / f"{module}.py")
    }
    assert not stale, f"MODULE_ONLY names that are no longer public names of their module: {stale}"


def test_the_probabilities_switch_helpers_are_the_modules_own() -> None:
    from obliviate.extraction import substitute, target

    for name in PROBABILITIES_SWITCH:
        assert name in package.__all__, name
        own = getattr(substitute, name, None) or getattr(target, name)
        assert getattr(package, name) is own, name


def test_all_lists_only_importable_names() -> None:
    assert len(set(package.__all__)) == len(package.__all__)
    for name in package.__all__:
        assert hasattr(package, name), name
