"""Calibration on real images whose classes overlap (the report: `clap`'s ECE 41% against
`cgil`'s 18.5% on real photos). The images are scikit-learn's handwritten digits
(devtools/digits.py), ten classes with their real names in five tasks of two, embedded by
the demo's CLIP and trained by the real stages at the demo's schedule (about 3 minutes)."""

from __future__ import annotations

import os

import pytest
from support.common import inside_project

from devtools.digits import write_digit_images

pytestmark = pytest.mark.slow

# The stages' seed (class order, replay draws, training). RECALL_TEST_SEED and
# RECALL_TEST_NOISE rerun the test on another seed or generator setting.
SEED = int(os.environ.get("RECALL_TEST_SEED", "1"))


@pytest.fixture(scope="module")
def digits_world(tmp_path_factory):
    """The demo's CLIP (pretrained on the shapes world, as `make demo` does) and the
    digits' embeddings, in a project folder of their own; yields the digits' overrides."""
    from pipeline import config
    from pipeline.stages.backbone import run_backbone
    from pipeline.stages.embed import run_embed, run_embed_text
    from pipeline.stages.prepare import run_prepare

    root = tmp_path_factory.mktemp("digits")
    with inside_project(root):
        shapes = config.load(None, ["paths.prepared=shapes", "tracking.register_classifier=false"])
        run_prepare(shapes)
        run_backbone(shapes)
        images, names = write_digit_images(root / "digits")
        data = ["dataset=imagefolder", f"dataset.root={images}", f"dataset.names_file={names}", "split.n_tasks=5",
                "embed.num_workers=0", "tracking.register_classifier=false"]
        cfg = config.load(None, data)
        run_prepare(cfg)
        for split in ("train", "test"):
            run_embed(cfg, split)
        run_embed_text(cfg)
        yield root, data


def test_clap_is_no_worse_calibrated_than_cgil_on_overlapping_real_images(digits_world, monkeypatch):
    from benchmarks.compare_methods import run as run_method

    root, data = digits_world
    monkeypatch.chdir(root)
    monkeypatch.setenv("RECALL_CONF_DIR", str(root / "conf"))
    noise = os.environ.get("RECALL_TEST_NOISE")
    overrides = [*data, *([f"generator.observation_noise={noise}"] if noise else [])]
    ece = {}
    for method in ("cgil", "clap"):
        report = run_method(SEED, method, root / f"runs-{noise or 'default'}", overrides)
        ece[method] = report["ece_last"]
        print(method, report["last_accuracy"], report["ece_last"])
    assert ece["clap"] <= ece["cgil"], ece
