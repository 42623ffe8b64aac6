from __future__ import annotations

import pytest
import yaml

from pipeline import config
from pipeline.config import ConfigError

from conftest import REPO


def test_params_yaml_is_the_default_composition(project):
    """DVC reads params.yaml; it must be exactly what the Hydra groups compose to."""
    composed = config.compose()
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed == composed
    config.validate(committed)


@pytest.mark.parametrize(
    "override",
    ["dataset=imagefolder", "dataset=cifar100", "dataset=imagenet_r", "backbone=vit_b16_openai",
     "backbone=vit_l14_openai", "method=cgil", "method=zeroshot", "method=sequential", "method=joint",
     "generator=gauss", "generator=mog", "generator=vae", "tracking=server"],
)
def test_every_group_option_composes_and_validates(project, override):
    overrides = [override]
    if override == "dataset=imagefolder":
        overrides.append("dataset.root=/data/images")
    cfg = config.load(None, overrides)
    group, option = override.split("=")
    if group == "tracking":
        assert cfg.tracking.uri == "http://127.0.0.1:5000"
    else:
        assert getattr(cfg, group).name == option


def test_demo_and_paper_experiments(project):
    demo = config.load(None, [])
    paper = config.load(None, ["experiment=paper"])
    assert (demo.generator.hidden, demo.generator.epochs) == (256, 200)
    assert (paper.generator.hidden, paper.generator.latent, paper.generator.epochs) == (512, 256, 500)
    assert config.load(None, ["generator=gauss"]).generator.name == "gauss"


def test_every_method_trains_on_the_same_schedule(project):
    demo = {m: config.load(None, [f"method={m}"]).method.prompt for m in ("sequential", "cgil", "clap", "joint")}
    assert {(p.epochs, p.per_class_per_epoch, p.lr) for p in demo.values()} == {(20, 128, 0.05)}
    paper = {m: config.load(None, ["experiment=paper", f"method={m}"]).method.prompt for m in ("cgil", "clap")}
    assert {(p.epochs, p.per_class_per_epoch) for p in paper.values()} == {(60, 256)}
    # One value moves every method's budget.
    assert config.load(None, ["method=cgil", "schedule.epochs=7"]).method.prompt.epochs == 7


@pytest.mark.parametrize(
    "profile, dataset, what_to_download",
    [("cifar100_vitb16", "cifar100", "cifar-100-python.tar.gz"), ("imagenet_r_vitb16", "imagenet_r", "imagenet-r.tar")],
)
def test_paper_profiles_set_a_whole_paper_run_and_fail_clearly_offline(project, profile, dataset, what_to_download):
    from pipeline import backbone as backbone_lib
    from pipeline.backbone import BackboneError
    from pipeline.data import prepare_dataset
    from pipeline.data.prepare import DatasetUnavailable

    cfg = config.load(None, [f"experiment={profile}", f"dataset.root={project / 'raw'}"])
    assert (cfg.dataset.name, cfg.backbone.arch, cfg.backbone.pretrained) == (dataset, "ViT-B-16", "openai")
    assert cfg.split.n_tasks == 10
    assert (cfg.method.name, cfg.method.prompt.epochs, cfg.method.prompt.per_class_per_epoch) == ("clap", 60, 256)
    assert cfg.method.prompt.lr == 0.05 and (cfg.generator.hidden, cfg.generator.epochs) == (512, 500)
    # Offline, the first step that needs the data, and the one that needs the weights, say
    # what to download and where.
    with pytest.raises(DatasetUnavailable) as err:
        prepare_dataset(cfg)
    assert what_to_download in str(err.value) and str(project / "raw") in str(err.value)
    with pytest.raises(BackboneError, match="backbone=local_file"):
        backbone_lib.materialise(cfg.backbone, "models/backbone")


def test_local_file_backbone_needs_its_checkpoint(project):
    with pytest.raises(ConfigError, match=r"checkpoint"):
        config.load(None, ["backbone=local_file"])
    cfg = config.load(None, ["backbone=local_file", "backbone.checkpoint=/w/model.safetensors"])
    assert cfg.backbone.source == "file"


def test_unknown_group_option_lists_valid_options(project):
    with pytest.raises(ConfigError) as err:
        config.load(None, ["dataset=nope"])
    message = str(err.value)
    assert "nope" in message
    for option in ("cifar100", "imagefolder", "imagenet_r", "shapes"):
        assert option in message


def test_unknown_option_in_params_file_lists_valid_options(project, tmp_path):
    raw = config.compose()
    raw["generator"]["name"] = "diffusion"
    with pytest.raises(ConfigError) as err:
        config.validate(raw, source="params.yaml")
    assert "generator: unknown option 'diffusion'" in str(err.value)
    assert "gauss, mog, vae" in str(err.value)


def test_unknown_key_is_named(project):
    raw = config.compose()
    raw["embed"]["batchsize"] = 3
    with pytest.raises(ConfigError, match=r"embed\.batchsize: unknown key"):
        config.validate(raw)


def test_unknown_key_inside_a_tagged_group_is_named_without_the_tag(project):
    raw = config.compose()
    raw["dataset"]["shapes"]["colours"] = ["red"]
    with pytest.raises(ConfigError, match=r"dataset\.shapes\.colours: unknown key"):
        config.validate(raw)


def test_wrong_type_is_named(project):
    with pytest.raises(ConfigError, match=r"embed\.batch_size"):
        config.load(None, ["embed.batch_size=lots"])


def test_out_of_range_value_is_named(project):
    with pytest.raises(ConfigError, match=r"split\.n_tasks"):
        config.load(None, ["split.n_tasks=0"])


def test_unset_required_value_is_named(project, tmp_path):
    raw = config.compose(["dataset=imagefolder", "dataset.root=x"])
    raw["dataset"]["root"] = "???"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"dataset\.root: required value is not set"):
        config.load(path)


def test_holdout_pair_must_be_a_class(project):
    with pytest.raises(ConfigError, match=r"pink circle"):
        config.load(None, ["dataset.shapes.holdout_pairs=[pink circle]"])


def test_template_needs_one_slot(project):
    with pytest.raises(ConfigError, match=r"templates"):
        config.load(None, ["dataset.templates=[a photo]"])


def test_fingerprint_ignores_tracking_and_follows_seed(project):
    a = config.load(None, [])
    b = config.load(None, ["tracking=server"])
    c = config.load(None, ["seed=1"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert a.fingerprint("dataset") == c.fingerprint("dataset")
