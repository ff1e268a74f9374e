"""Issue 21, item 6: the crowd recipe's data and preset. ``--data synthetic-crowded`` trains on crowded images
(more than 100 objects each, never the held-out ones) and holds out exactly ``synthetic``'s crowded split; its
preset has more queries and a higher detection cap than objects per image."""

from __future__ import annotations

import numpy as np

from deformable_detr.cli import build_parser, train_config_from_args
from deformable_detr.data import SyntheticSpec, crowded_spec, render_image


def test_crowded_training_images_are_crowded_and_not_the_held_out_ones():
    spec = crowded_spec()
    image, annotations = render_image(spec, "train", 0)
    assert image.size == (spec.crowded_image_size,) * 2 and len(annotations) > 100
    held_out, held_out_annotations = render_image(spec, "crowded", 0)
    assert not np.array_equal(np.asarray(image), np.asarray(held_out))
    # The held-out split is synthetic's own crowded split, image for image.
    same, same_annotations = render_image(SyntheticSpec(), "crowded", 0)
    assert np.array_equal(np.asarray(held_out), np.asarray(same)) and held_out_annotations == same_annotations


def test_existing_synthetic_folders_keep_their_names():
    # The new field is left out of the hash at its default: the folders written before it (names taken from the
    # commit before it) are reused, not regenerated.
    assert SyntheticSpec().digest() == "e07389835b" and SyntheticSpec(image_size=96).digest() == "b77f29688f"
    assert crowded_spec().digest() not in ("e07389835b", "b77f29688f")


def test_crowd_preset_has_more_queries_and_detections_than_objects():
    args = build_parser().parse_args(["train", "--data", "synthetic-crowded", "--output-dir", "o"])
    cfg = train_config_from_args(args)
    spec = crowded_spec()
    assert cfg.model_overrides["num_queries"] > spec.crowded_max_objects and cfg.max_dets > spec.crowded_max_objects
    assert cfg.image_size == spec.crowded_image_size and cfg.val_split == "crowded"
    assert cfg.model_overrides["two_stage"] and cfg.model_overrides["with_box_refine"]
