from __future__ import annotations

import pytest
import yaml
from support.common import REPO

from pipeline import config
from pipeline.config import ConfigError


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
    from pipeline.clip import backbone as backbone_lib
    from pipeline.clip.backbone import BackboneError
    from pipeline.data import prepare_dataset
    from pipeline.data.prepare import DatasetUnavailable

    cfg = config.load(None, [f"experiment={profile}", f"dataset.root={project / 'raw'}"])
    assert (cfg.dataset.name, cfg.backbone.arch, cfg.backbone.pretrained) == (dataset, "ViT-B-16-quickgelu", "openai")
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


def test_stream_demo_world_is_the_demo_world(project):
    """The stream demo copies the shapes world (Hydra cannot reuse another group's values):
    the two must not drift apart."""
    stream = config.load(None, ["experiment=stream_demo"])
    assert stream.dataset.shapes == config.load(None, []).dataset.shapes
    assert stream.dataset.templates == config.load(None, []).dataset.templates


def _ledger(path, accepted: int, rejected: int = 1) -> None:
    entries = [{"batch": f"b{i}", "status": "accepted", "task": i} for i in range(1, accepted + 1)]
    entries += [{"batch": "bad", "status": "rejected", "reason": "empty"}] * rejected
    path.write_text(yaml.safe_dump({"version": 1, "entries": entries}))


def test_stream_tasks_follow_the_ledger_and_name_each_task_s_own_inputs(project):
    assert config.load(None, ["experiment=stream_demo"]).split.n_tasks == 0  # nothing ingested yet
    _ledger(project / "ledger.yaml", accepted=2)
    cfg = config.load(None, ["experiment=stream_demo"])
    assert cfg.split.n_tasks == 2 and cfg.stream
    second = cfg.split.tasks["02"]
    assert (second.classes, second.train, second.text, second.after) == (
        "data/tasks/task-02.json", "data/embeddings/task-02/train", "data/embeddings/task-02/text.safetensors",
        "metrics/tasks/task-01.json",
    )
    assert cfg.mode_stages.embed == [] and list(cfg.mode_stages.intake) == ["01", "02"]
    benchmark = config.load(None, [])
    assert benchmark.split.tasks["02"].train == "data/embeddings/train" and not benchmark.mode_stages.intake
    assert benchmark.mode_stages.embed == ["train", "test"]


def test_stream_intake_stages_read_and_write_each_task_s_chain_entry(project):
    """dvc.yaml builds intake's paths from the task key (params.yaml holds the chain once):
    they must be the files the later stages of the same task read."""
    import shutil
    import subprocess

    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", project)
    _ledger(project / "ledger.yaml", accepted=3)
    config.write_params(project / "params.yaml", config.compose(["experiment=stream_demo"]))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    chain = config.load(project / "params.yaml").split.tasks
    with Repo(str(project)) as repo:
        intake = {s.name: s for s in repo.index.stages if s.name.startswith("intake@")}
        assert sorted(intake) == ["intake@01", "intake@02", "intake@03"]
        for key, entry in chain.items():
            stage = intake[f"intake@{key}"]
            assert stage.cmd == f"recall intake --task {entry.task}"
            assert {o.def_path for o in stage.outs} >= {entry.train, entry.test, entry.text}
            assert entry.classes in {d.def_path for d in stage.deps}


def test_ingest_sets_the_task_count_in_params_keeping_overrides(project):
    params = project / "params.yaml"
    config.write_params(params, config.compose(["experiment=stream_demo", "dataset.source=s3://b/in", "seed=3"]))
    assert config.set_task_count(params, 3)
    cfg = config.load(params)
    assert (cfg.split.n_tasks, cfg.seed, cfg.dataset.source) == (3, 3, "s3://b/in")
    assert list(cfg.split.tasks) == list(cfg.mode_stages.intake) == ["01", "02", "03"]
    assert not config.set_task_count(params, 3)


def test_a_hand_edited_task_chain_is_refused(project, tmp_path):
    raw = config.compose([])
    raw["split"]["tasks"]["01"]["train"] = "elsewhere"
    with pytest.raises(ConfigError, match="split.tasks must be the chain"):
        config.validate(raw)


def test_the_tiny_world_is_one_config_shared_by_tests_and_scratch_projects():
    """`experiment=tiny` is what scratch projects merge and what in-process tests override
    with: one definition, valid as a config of its own."""
    from support.common import TINY

    from devtools.scratch import TINY_CONFIG, as_overrides
    from pipeline import config

    tiny = config.load(None, ["experiment=tiny"])
    assert tiny.split.n_tasks == 2 and tiny.dataset.shapes.colors == ["red", "green", "blue"]
    as_experiment, as_overridden = config.compose(["experiment=tiny"]), config.compose(as_overrides(TINY_CONFIG))
    # conf/config.yaml's own values (its embed: block) win over an experiment's, as they
    # always have; the world, the split, the backbone and the training are the experiment's.
    for section in ("dataset", "split", "backbone", "generator", "method"):
        assert as_experiment[section] == as_overridden[section], section
    assert set(as_overrides(TINY_CONFIG)) - set(TINY) == {"split.n_tasks=2"}


def test_params_yaml_keeps_task_keys_strings_for_dvc(tmp_path):
    """DVC reads params.yaml as YAML 1.2, where an unquoted ``08`` is the integer 8: with 8
    tasks or more, tasks 08 and 09 lost their stages (``'<' not supported between 'int' and
    'str'`` in `dvc commit`)."""
    from ruamel.yaml import YAML

    from pipeline import config

    path = tmp_path / "params.yaml"
    config.write_params(path, config.compose(["split.n_tasks=12"]))
    as_dvc_reads = YAML(typ="safe").load(path.read_text())
    assert list(as_dvc_reads["split"]["tasks"]) == [f"{t:02d}" for t in range(1, 13)]
    assert yaml.safe_load(path.read_text()) == as_dvc_reads  # and PyYAML / Hydra read the same
