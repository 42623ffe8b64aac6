"""The config's schema: one strict, frozen pydantic model per group and section, so an unknown
key or a value of the wrong type or range fails validation with the key named.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used; the message names the key at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapesWorld(_Strict):
    colors: list[str] = Field(min_length=2)
    shapes: list[str] = Field(min_length=2)
    image_size: int = Field(ge=16, le=512)
    train_per_class: int = Field(ge=2)
    test_per_class: int = Field(ge=1)
    pretrain_per_class: int = Field(ge=1)
    holdout_pairs: list[str] = []
    noise: float = Field(ge=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _holdout_pairs_exist(self) -> "ShapesWorld":
        names = {f"{c} {s}" for c in self.colors for s in self.shapes}
        for pair in self.holdout_pairs:
            if pair not in names:
                raise ValueError(
                    f"holdout pair {pair!r} is not a colour-shape class; classes are "
                    f"'<colour> <shape>' with colours {self.colors} and shapes {self.shapes}"
                )
        return self


class _DatasetBase(_Strict):
    templates: list[str] = Field(min_length=1)

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str]) -> list[str]:
        for template in templates:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
        return templates


class ShapesDataset(_DatasetBase):
    name: Literal["shapes"]
    shapes: ShapesWorld


class ImageFolderDataset(_DatasetBase):
    name: Literal["imagefolder"]
    root: str
    manifest: str | None = None
    names_file: str | None = None
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0


class Cifar100Dataset(_DatasetBase):
    name: Literal["cifar100"]
    root: str
    download: bool = False


class ImageNetRDataset(_DatasetBase):
    name: Literal["imagenet_r"]
    root: str
    names_file: str | None = None
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0


class StreamDataset(_DatasetBase):
    """Batches of new classes arriving in a folder or an S3 prefix (``recall ingest``)."""

    name: Literal["stream"]
    # A folder, or s3://bucket/prefix; region and credentials come from the AWS environment.
    source: str = Field(min_length=1)
    # An S3-compatible endpoint (MinIO, moto); null: AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str | None = None
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    # The authoritative, shared ledger (one object per entry); null: the local file only.
    ledger_uri: str | None = None
    # The demo world: what the demo backbone pretrains on and `recall stream-demo` writes
    # as batches. Null for a real stream (with an open_clip backbone).
    shapes: ShapesWorld | None = None


DatasetConfig = Annotated[
    Union[ShapesDataset, ImageFolderDataset, Cifar100Dataset, ImageNetRDataset, StreamDataset],
    Field(discriminator="name"),
]


class PretrainConfig(_Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    seed: int = 0


class BackboneConfig(_Strict):
    name: str
    arch: str
    # pretrain: the demo's tiny CLIP trained here; hub: open_clip pretrained tag;
    # file: a local checkpoint file.
    source: Literal["pretrain", "hub", "file"]
    pretrained: str | None = None
    checkpoint: str | None = None
    pretrain: PretrainConfig | None = None

    @model_validator(mode="after")
    def _source_has_what_it_needs(self) -> "BackboneConfig":
        if self.source == "hub" and not self.pretrained:
            raise ValueError("source 'hub' needs 'pretrained' (an open_clip tag such as 'openai')")
        if self.source == "file" and not self.checkpoint:
            raise ValueError("source 'file' needs 'checkpoint' (a path to a local weights file)")
        if self.source == "pretrain" and self.pretrain is None:
            raise ValueError("source 'pretrain' needs a 'pretrain' section")
        return self


class ScheduleConfig(_Strict):
    """The prompt-learning budget every method that trains prompts reads (its ``prompt``
    section interpolates these), so a comparison runs them all at the same budget."""

    epochs: int = Field(ge=1)
    per_class_per_epoch: int = Field(ge=1)
    lr: float = Field(gt=0)


class PromptConfig(_Strict):
    n_ctx: int = Field(ge=1)
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    per_class_per_epoch: int = Field(ge=1)


class HeadConfig(_Strict):
    mc_train: int = Field(ge=1)
    mc_test: int = Field(ge=1)
    kl_weight: float = Field(ge=0)
    lang_weight: float = Field(ge=0)
    prior: Literal["standard", "clip"]
    balanced_finetune_epochs: int = Field(ge=0)
    balanced_finetune_lr_scale: float = Field(gt=0)
    # sigma = softplus(B x) * (1 - std_floor) + std_floor
    std_floor: float = Field(default=1e-3, ge=0, lt=1)
    # The head's own optimizer and learning rate (the prompts keep AdamW at prompt.lr):
    # adamw: constant lr; sgd: the CLAP reference's schedule (pipeline/method/prompts.make_optimizer).
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(gt=0)
    attention_ff_width: int = Field(default=2048, ge=1)
    attention_dropout: float = Field(default=0.1, ge=0, lt=1)
    zero_init_attention: bool = False
    # template_std: sigma starts at the text's template spread; pytorch_default: nn.Linear's.
    encoder_bias: Literal["template_std", "pytorch_default"] = "template_std"


class MethodConfig(_Strict):
    name: Literal["zeroshot", "sequential", "cgil", "clap", "joint", "probe"]
    train_on: Literal["none", "current_real", "replay", "all_real"]
    prompt: PromptConfig | None = None
    head: HeadConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "MethodConfig":
        if self.train_on != "none" and self.prompt is None:
            raise ValueError(f"method {self.name!r} trains prompts and needs a 'prompt' section")
        if self.name == "clap" and self.head is None:
            raise ValueError("method 'clap' needs a 'head' section")
        if self.name != "clap" and self.head is not None:
            raise ValueError(f"method {self.name!r} has no probabilistic head; set 'head: null' or use method 'clap'")
        return self


class VaeGenerator(_Strict):
    name: Literal["vae"]
    hidden: int = Field(ge=1)
    latent: int = Field(ge=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0)
    chunk_classes: int | None = Field(default=None, ge=1)
    # none: a sample is the decoder's output, as the reference's (its prior samples spread far
    # less than the class's embeddings); matched_variance / matched_covariance: plus Gaussian
    # noise that gives the samples the class's own per-dimension variance / covariance
    # (README, "Calibration on real images").
    observation_noise: Literal["none", "matched_variance", "matched_covariance"] = "matched_covariance"


class GaussGenerator(_Strict):
    name: Literal["gauss"]


class MogGenerator(_Strict):
    name: Literal["mog"]
    components: int = Field(ge=1)


GeneratorConfig = Annotated[
    Union[VaeGenerator, GaussGenerator, MogGenerator], Field(discriminator="name")
]


class TaskLink(_Strict):
    """One task's entry in ``split.tasks`` (derived, see pipeline/config/task_chain.py)."""

    task: int
    previous: str
    classes: str
    train: str
    test: str
    text: str
    after: str


class SplitConfig(_Strict):
    # The stream's count comes from its ledger (0 before the first ingest).
    n_tasks: int = Field(ge=0)
    class_order: list[str] | list[int] | None = None
    tasks: dict[str, TaskLink]


class ModeStages(_Strict):
    """Mode-specific stage families (derived from the dataset; empty lists make no stage)."""

    embed: list[str]
    embed_text: list[str]
    intake: dict[str, int]


class GateConfig(_Strict):
    """When a task's classifier version may take the ``champion`` alias (fractions, not %)."""

    max_task_drop: float = Field(default=0.10, ge=0, le=1)
    max_average_drop: float = Field(default=0.05, ge=0, le=1)
    # The new task's own accuracy must reach this: "zero_shot" (CLIP's zero-shot accuracy on
    # the same test images among the same seen classes, less max_task_drop), a fixed
    # fraction, or none (null).
    new_task_floor: Union[Literal["zero_shot", "none"], Annotated[float, Field(ge=0, le=1)], None] = "zero_shot"

    @field_validator("new_task_floor")
    @classmethod
    def _none_means_no_floor(cls, value):
        return None if value == "none" else value


class TrackingConfig(_Strict):
    uri: str | None = None
    experiment: str | None = None
    # Registered models are named <experiment>-<lineage>-<kind>. Unset, the lineage part is
    # derived (<method>-s<seed>-<hash of what determines the models>), so runs of other
    # methods, seeds or class orders never share a model; set, it is this stable name and
    # every run with it meets the same champion (a production loop).
    lineage: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    # Register each task's classifier as a servable MLflow pyfunc model version.
    register_classifier: bool = True
    gate: GateConfig = GateConfig()
    # An http(s) server is checked before a step starts, and MLflow's own retries of every
    # later request are bounded by the same figures, so a server that is down fails a step
    # in seconds with one line (MLflow's defaults retry for about four minutes). Each try
    # waits at most connect_timeout_s; after try i (from 0) the next starts
    # retry_backoff_s * 2**i seconds later; retries + 1 tries in all.
    connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    retries: int = Field(default=3, ge=0, le=20)
    retry_backoff_s: int = Field(default=1, ge=0, le=60)


class EmbedConfig(_Strict):
    batch_size: int = Field(ge=1)
    num_workers: int = Field(ge=0)
    chunk_size: int = Field(ge=1)
    on_bad_image: Literal["error", "skip"] = "error"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"


class ClusterConfig(_Strict):
    """Scale-out of the embed/intake and generators stages (pipeline.scaleout)."""

    # local: one process, as always; dask: shards through dask.distributed.
    engine: Literal["local", "dask"] = "local"
    # A running scheduler (tcp://host:8786); null starts a LocalCluster inside the stage.
    address: str | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    connect_timeout_s: float = Field(default=30.0, gt=0)


class PathsConfig(_Strict):
    prepared: str
    split: str
    backbone: str
    embeddings: str
    generators: str
    replay: str
    prompts: str
    metrics: str
    evaluations: str
    plots: str
    ledger: str = "ledger.yaml"
    tasks: str = "data/tasks"


class Config(_Strict):
    seed: int
    dataset: DatasetConfig
    split: SplitConfig
    backbone: BackboneConfig
    method: MethodConfig
    generator: GeneratorConfig
    schedule: ScheduleConfig
    tracking: TrackingConfig
    embed: EmbedConfig
    cluster: ClusterConfig = ClusterConfig()
    paths: PathsConfig
    mode_stages: ModeStages

    @property
    def stream(self) -> bool:
        """The update loop (batches arriving in a source) rather than a benchmark split."""
        return self.dataset.name == "stream"

    @model_validator(mode="after")
    def _derived_sections_follow(self) -> "Config":
        from pipeline.config.task_chain import stage_switches, task_chain

        if not self.stream and self.split.n_tasks < 1:
            raise ValueError("split.n_tasks: a benchmark needs at least 1 task")
        p = self.paths
        expected = task_chain(self.split.n_tasks, self.dataset.name, p.embeddings, p.split, p.tasks, p.evaluations, p.prompts)
        if {k: v.model_dump() for k, v in self.split.tasks.items()} != expected:
            raise ValueError(
                f"split.tasks must be the chain derived from split.n_tasks={self.split.n_tasks}, the dataset and "
                "the paths (${recall_task_chain:...} in conf/config.yaml); change split.n_tasks instead"
                + (" (the stream's comes from its ledger: run `recall ingest`)" if self.stream else "")
            )
        switches = stage_switches(self.dataset.name, expected)
        if self.mode_stages.model_dump() != switches:
            raise ValueError("mode_stages must be derived from the dataset (${recall_stages:...} in conf/config.yaml)")
        return self

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (when none are named, all but tracking and
        cluster: where a run is tracked and where it computes never change its results)."""
        data = self.model_dump(mode="json")
        keys = sections or tuple(k for k in data if k not in ("tracking", "cluster"))
        blob = json.dumps({k: data[k] for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
