"""A reduction's picture, ``subset.png``: the chosen images by class, class shares against the pool, H per restart.

Before it, a reduction left only numbers: ``subset.npy`` (indices), ``summary.json`` (a class histogram among them)
and ``restarts.json``, so seeing which images DRMI chose, or raw MI's lean towards one low-entropy class (SPEC
section 2), meant writing a script.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from flows.artifacts import SUBSET_PLOT_IMAGES, reduction_title, subset_plot, subset_plot_images
from flows.cli import main
from obliviate.data import load_dataset
from obliviate.reduction.drmi import drmi_reduce
from obliviate.reduction.mi import mi_matrix
from storage.objects import ObjectStore


def test_a_large_subset_is_drawn_as_an_evenly_spaced_sample_that_keeps_each_class_share():
    labels = np.repeat(np.arange(10), 100)  # a pool of 1,000: class c at rows 100c .. 100c+99
    rng = np.random.default_rng(0)
    ones = rng.choice(np.arange(100, 200), size=90, replace=False)  # a subset leaning to class 1, as raw MI does
    others = rng.choice(np.setdiff1d(np.arange(1000), np.arange(100, 200)), size=210, replace=False)
    subset = rng.permutation(np.concatenate([ones, others]))

    shown = subset_plot_images(labels=labels, subset=subset)

    assert len(shown) == SUBSET_PLOT_IMAGES and len(set(shown.tolist())) == SUBSET_PLOT_IMAGES
    assert set(shown.tolist()) <= set(subset.tolist())
    assert np.all(np.diff(labels[shown]) >= 0)  # sorted by class
    assert abs(int(np.sum(labels[shown] == 1)) - 30) <= 1  # 90 of 300 chosen: 30 of the 100 drawn
    assert set(labels[shown].tolist()) == set(labels[subset].tolist())  # no class left out


def test_a_small_subset_is_drawn_whole_in_class_order_keeping_the_subsets_order_within_a_class():
    labels = np.array([3, 1, 3, 0, 1, 2])
    shown = subset_plot_images(labels=labels, subset=np.array([2, 4, 0, 1, 3]))
    assert shown.tolist() == [3, 4, 1, 2, 0]


def test_in_process_reduce_publishes_its_picture_in_the_manifest_and_names_it(tmp_path, capsys):
    options = ["--data", "digits", "--k", "12", "--starts", "5", "--workers", "0", "--out", str(tmp_path)]
    assert main(["reduce", *options]) == 0
    out = capsys.readouterr().out
    (folder,) = tmp_path.glob("reduce-*")
    store = ObjectStore(f"file://{tmp_path}")
    manifest = store.read_manifest(f"{folder.name}/manifest.json")
    assert set(manifest.members) == {"subset", "restarts", "plot", "summary"}
    picture = store.get_member(manifest, "plot")  # checksum-pinned like the other members
    assert f"{store.uri(folder.name)}/subset.png" in out

    summary = json.loads((folder / "summary.json").read_text())
    data = load_dataset("digits")
    expected = drmi_reduce(mi_matrix(data.images, levels=data.levels), k=12, num_starts=5, rng=np.random.default_rng(0))
    restart_h = [r.h for r in expected.restarts]
    drawn = subset_plot(pool=data, subset=expected.subset, restart_h=restart_h, title=reduction_title(summary))
    assert picture == drawn  # the picture of this very subset and its restarts
    image = Image.open(io.BytesIO(picture))
    assert image.format == "PNG" and image.size == (1400, 460)
    assert image.info["Description"] == "DRMI reduction: the 12 of 1797 images of digits with the least MI"


def test_the_picture_changes_with_the_subset_it_draws():
    """Rendering is deterministic, and another subset or another restart's H draws another picture."""
    data = load_dataset("digits")
    options = {"pool": data, "title": "t"}
    first = subset_plot(subset=np.arange(10), restart_h=[1.0, 2.0], **options)
    assert subset_plot(subset=np.arange(10), restart_h=[2.0, 1.0], **options) == first  # H is drawn best first
    assert subset_plot(subset=np.arange(1, 11), restart_h=[1.0, 2.0], **options) != first
    assert subset_plot(subset=np.arange(10), restart_h=[1.0, 3.0], **options) != first
